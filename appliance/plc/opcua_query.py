"""ResultManagement (OPC 40100-1 7.10): stored results for any logged-in user.

Recently published results are answered from memory (they may not have reached DuckDB yet);
older ones from the store, in a worker thread since DuckDB calls block.  Arguments are checked
before anything runs: a wrong type gets BadTypeMismatch, a count outside UInt32 BadOutOfRange.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from asyncua import ua

from appliance.plc.opcua_control import ArgumentError, Jobs, status, text_id
from appliance.plc.opcua_results import RESULT_COMPLETED, RESULT_FAILED, ResultEncoder, result_from_row
from appliance.result import PartResult
from appliance.store import ResultFilter

if TYPE_CHECKING:
    from appliance.store import Store

log = logging.getLogger(__name__)

RECENT = 1024
"""Published results kept in memory for GetResultById."""
MAX_LIST = 1000
"""Most results one GetResultListFiltered call returns."""
UINT32_MAX = 0xFFFF_FFFF
UNKNOWN_JOB = "unrecorded"
"""JobId of results published before this start (job ids are not stored)."""

Bad = ua.StatusCodes


class ResultQueries:
    def __init__(self, store: Store, encoder: ResultEncoder, jobs: Jobs) -> None:
        self.store = store
        self.encoder = encoder
        self.jobs = jobs
        self._recent: OrderedDict[str, PartResult] = OrderedDict()

    def remember(self, result: PartResult) -> None:
        self._recent[result.result_id] = result
        if len(self._recent) > RECENT:
            self._recent.popitem(last=False)

    def _data(self, result: PartResult) -> Any:
        return self.encoder.result_data(result, self.jobs.job_of(result.result_id) or UNKNOWN_JOB)

    async def get_result_by_id(self, parent: ua.NodeId, *args: ua.Variant) -> Any:
        try:
            result_id = text_id(args[0].Value if args else None, "resultId")
        except ArgumentError as exc:
            return status(exc.code)
        result = self._recent.get(result_id)
        if result is None and result_id:
            row = await asyncio.to_thread(self._get_stored, result_id)
            result = result_from_row(row) if row is not None else None
        if result is None:
            return status(Bad.BadNotFound)
        return [ua.Variant(0, ua.VariantType.UInt32),
                ua.Variant(self._data(result), ua.VariantType.ExtensionObject),
                ua.Variant(0, ua.VariantType.Int32)]

    def _get_stored(self, result_id: str) -> dict[str, Any] | None:
        self.store.flush()
        return self.store.get(result_id)

    async def get_result_list_filtered(self, parent: ua.NodeId, *args: ua.Variant) -> Any:
        values = [a.Value for a in args] + [None] * (12 - len(args))
        state, meas, part, ext_recipe, int_recipe, ext_conf, int_conf, product, job = values[:9]
        try:
            state = _integer(state, "resultState", -(2 ** 31), 2 ** 31 - 1)
            max_results = _integer(values[9], "maxResults", 0, UINT32_MAX)
            start_index = _integer(values[10], "startIndex", 0, UINT32_MAX)
            unsupported = [name for name, v in (("measId", meas), ("externalRecipeId", ext_recipe),
                                                ("externalConfigurationId", ext_conf),
                                                ("internalConfigurationId", int_conf),
                                                ("productId", product)) if text_id(v, name)]
            part_id = text_id(part, "partId")
            recipe = text_id(int_recipe, "internalRecipeId")
            job_id = text_id(job, "jobId")
        except ArgumentError as exc:
            log.info("GetResultListFiltered refused: %s", exc)
            return status(exc.code)
        if unsupported:
            log.info("GetResultListFiltered: unsupported filters %s", unsupported)
            return status(Bad.BadNotSupported)
        limit = min(max_results or MAX_LIST, MAX_LIST)
        wanted = {0: None, RESULT_COMPLETED: "ok", RESULT_FAILED: "failed"}.get(state, "none")
        if job_id:
            ids = self.jobs.results_of(job_id)
            results = [r for rid in ids if (r := self._recent.get(rid)) is not None]
            results = [r for r in results if (wanted is None or r.status == wanted)
                       and (not part_id or r.part_id == part_id)
                       and (not recipe or r.model_version == recipe)]
            page, more = results[start_index:start_index + limit], len(results) > start_index + limit
        else:
            query = ResultFilter(status=wanted, part_id=part_id or None, limit=limit + 1, offset=start_index)
            rows = await asyncio.to_thread(self._query, query)
            results = [result_from_row(row) for row in rows]
            if recipe:
                results = [r for r in results if r.model_version == recipe]
            page, more = results[:limit], len(rows) > limit
        data = [self._data(r) for r in page]
        return [ua.Variant(not more, ua.VariantType.Boolean), ua.Variant(len(data), ua.VariantType.UInt32),
                ua.Variant(0, ua.VariantType.UInt32), ua.Variant(data, ua.VariantType.ExtensionObject),
                ua.Variant(0, ua.VariantType.Int32)]

    def _query(self, query: ResultFilter) -> list[dict[str, Any]]:
        self.store.flush()
        return self.store.query(query)

    async def release_result_handle(self, parent: ua.NodeId, *args: ua.Variant) -> Any:
        return [ua.Variant(0, ua.VariantType.Int32)]


def _integer(value: Any, what: str, low: int, high: int) -> int:
    """An integer argument (null: 0) between ``low`` and ``high``."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentError(Bad.BadTypeMismatch, f"{what}: expected an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise ArgumentError(Bad.BadOutOfRange, f"{what}: {value} is outside {low}..{high}")
    return value
