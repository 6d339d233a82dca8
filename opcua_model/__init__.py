"""The OPC UA information model: NodeSet2 XML files and the code that loads them into a server.

Two files, loaded in this order:

* ``Opc.Ua.MachineVision.Subset.NodeSet2.xml`` — the part of OPC 40100-1 (Machine Vision) a basic
  vision system needs, in the namespace ``http://opcfoundation.org/UA/MachineVision``: the Id
  structures, ``ResultDataType``, the state machine and management object types and
  ``ResultReadyEventType``.  Browse names and structure layouts follow the specification; the
  NodeIds are this model's own (string ids), so clients find nodes by browse path and decode
  structures through their DataTypeDefinition, as they do for any server.
* ``DefectAppliance.NodeSet2.xml`` — the appliance's own namespace: ``DefectResultDataType`` (the
  ``ResultContent`` of every result) and the ``VisionSystem`` instance under ``Objects``.

Loading registers a Python class for every structure (asyncua generates them from the
DataTypeDefinitions); :class:`LoadedModel` hands them out by browse name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from asyncua import ua

if TYPE_CHECKING:
    from asyncua import Server

MV_NAMESPACE = "http://opcfoundation.org/UA/MachineVision"
APP_NAMESPACE = "urn:defect-appliance:opcua"

MODEL_DIR = Path(__file__).resolve().parent
MODEL_FILES = (
    MODEL_DIR / "Opc.Ua.MachineVision.Subset.NodeSet2.xml",
    MODEL_DIR / "DefectAppliance.NodeSet2.xml",
)

STRUCTURES = (
    "RecipeIdExternalDataType", "RecipeIdInternalDataType", "ConfigurationIdDataType",
    "ProductIdDataType", "PartIdDataType", "MeasIdDataType", "JobIdDataType", "ResultIdDataType",
    "ProcessingTimesDataType", "ResultDataType", "HeadResultDataType", "DefectResultDataType",
)
"""Structured DataTypes of the two files (Machine Vision first, then the appliance's own)."""


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """Namespace indexes and generated structure classes of a server that loaded the model."""

    mv: int
    app: int
    structures: dict[str, type]

    def mv_node(self, name: str) -> ua.NodeId:
        return ua.NodeId(ua.String(name), ua.Int16(self.mv))

    def app_node(self, name: str) -> ua.NodeId:
        return ua.NodeId(ua.String(name), ua.Int16(self.app))

    def new(self, structure: str, **fields: Any) -> Any:
        """An instance of one of the model's structures, e.g. ``new("JobIdDataType", Id="J1")``."""
        return self.structures[structure](**fields)


async def load_model(server: Server) -> LoadedModel:
    """Import both NodeSet2 files into ``server`` (after ``init()``, before ``start()``)."""
    for path in MODEL_FILES:
        await server.import_xml(str(path))
    namespaces = await server.get_namespace_array()
    structures = {}
    for name in STRUCTURES:
        cls = getattr(ua, name, None)
        if cls is None:  # the importer generates them; a missing one means a broken model file
            raise RuntimeError(f"OPC UA model: structure {name} was not generated from {MODEL_DIR}")
        structures[name] = cls
    return LoadedModel(namespaces.index(MV_NAMESPACE), namespaces.index(APP_NAMESPACE), structures)
