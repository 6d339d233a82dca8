"""The OPC UA information model (NodeSet2 XML) and its loader; built in issue C."""
