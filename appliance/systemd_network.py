"""The systemd drop-in that opens appliance.service's IP firewall to the hosts a config names.

``systemd/appliance.service`` ships with ``IPAddressDeny=any`` and ``IPAddressAllow=localhost``: the
kernel drops every packet from elsewhere before the daemon sees it.  A plant deployment adds the
PLC networks in a drop-in; :func:`drop_in` writes it from the configuration, so the firewall and
``modbus.allowed_clients`` list the same hosts.  What the config cannot know (OPC UA and HTTP API
clients, a GigE Vision camera's network) is named in a comment to fill in, never guessed.
"""

from __future__ import annotations

from pathlib import Path

from appliance.config import AppConfig, loopback_host

DROP_IN = "/etc/systemd/system/appliance.service.d/plant-network.conf"


def drop_in(config: AppConfig, source: Path) -> str:
    """The drop-in's text: ``IPAddressAllow=`` for every modbus.allowed_clients network beyond this machine."""
    allow, todo = [], []
    m = config.modbus
    if m.enabled:
        allow = [f"IPAddressAllow={net}" for net in m.allowed_clients if not net.is_loopback]
        if not allow and not loopback_host(m.host):
            todo.append(f"modbus.host is {m.host}, but modbus.allowed_clients lists this machine only")
    if config.opcua.enabled and not loopback_host(config.opcua.host):
        todo.append(f"opcua.host is {config.opcua.host}: add IPAddressAllow= for the OPC UA clients (PLC, SCADA, MES)")
    if not loopback_host(config.api.host):
        todo.append(f"api.host is {config.api.host}: add IPAddressAllow= for the dashboard's and engineers' hosts")
    if config.camera.source == "genicam":
        todo.append("a GigE Vision camera: add IPAddressAllow= for its network (USB3 Vision needs nothing here)")
    if not allow and not todo:
        todo.append("nothing to add: everything this config serves listens on this machine only")
    return "\n".join([f"# {DROP_IN}",
                      f"# from `appliance systemd-network {source}`; appliance.service itself allows localhost only",
                      "[Service]",
                      *(["# modbus.allowed_clients", *allow] if allow else []),
                      *(f"# {line}" for line in todo)]) + "\n"
