"""Exported text that a spreadsheet cannot run (CSV/formula injection, OWASP "CSV Injection").

A part id or batch written by a PLC, an error message or a rule name ends up in the CSV export an
engineer opens in Excel or LibreOffice.  A cell that starts with ``=``, ``+``, ``-`` or ``@`` is
read as a formula there (``=HYPERLINK(…)`` to exfiltrate a row, ``@SUM(…)``, DDE), and so is one
that starts with a tab or a carriage return followed by one.  OWASP's remedy: prefix such a text
cell with a single quote, which the spreadsheet shows as text.  Numbers stay numbers (their column
types are not text), so ``-0.1`` in a numeric column is still -0.1.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

FORMULA_START = r"^[=+\-@\t\r]"
"""A text cell that starts with one of these is prefixed with a single quote."""


def neutralise_formulas(batch: pa.RecordBatch) -> pa.RecordBatch:
    """``batch`` with every text cell that a spreadsheet would read as a formula prefixed with ``'``."""
    columns = []
    for column in batch.columns:
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):  # DuckDB's text
            risky = pc.match_substring_regex(column, FORMULA_START)
            quote, nothing = pa.scalar("'", column.type), pa.scalar("", column.type)
            column = pc.if_else(risky, pc.binary_join_element_wise(quote, column, nothing), column)
        columns.append(column)
    return pa.RecordBatch.from_arrays(columns, schema=batch.schema)
