// The worked example of docs/plc-opcua.md: what a PLC/SCADA integrator writes with node-opcua.
//
//   OPCUA_USER=... OPCUA_PASSWORD=... node opcua_example.mjs opc.tcp://127.0.0.1:4840 <server cert.der>
//
// Connects with SignAndEncrypt (Basic256Sha256) as an operator, subscribes to ResultReadyEvents on
// the VisionSystem, writes the next part's id, calls StartSingleJob and prints the result.  The
// first run is refused until the appliance's administrator trusts this client's certificate
// (pki/rejected/ -> pki/trusted/ in the appliance's state directory).
import { createRequire } from "node:module";
import { readFileSync } from "node:fs";

const require = createRequire(import.meta.url);
const {
    OPCUAClient, MessageSecurityMode, SecurityPolicy, UserTokenType, AttributeIds, DataType, VariantArrayType,
    makeBrowsePath, constructEventFilter, ClientMonitoredItem, TimestampsToReturn,
} = require("node-opcua-client");
const { OPCUACertificateManager } = require("node-opcua-certificate-manager");

const [url = "opc.tcp://127.0.0.1:4840", serverCert = "var/pki/own/cert.der"] = process.argv.slice(2);
const certificateManager = new OPCUACertificateManager({ rootFolder: "./plc-pki", automaticallyAcceptUnknownCertificate: false });
await certificateManager.initialize();
await certificateManager.trustCertificate(readFileSync(serverCert)); // trust the appliance explicitly

const client = OPCUAClient.create({
    applicationName: "line-7-plc", clientCertificateManager: certificateManager, endpointMustExist: false,
    securityMode: MessageSecurityMode.SignAndEncrypt, securityPolicy: SecurityPolicy.Basic256Sha256,
    connectionStrategy: { maxRetry: 0 },
});
await client.connect(url);
let session;
try {
    session = await client.createSession({
        type: UserTokenType.UserName, userName: process.env.OPCUA_USER, password: process.env.OPCUA_PASSWORD,
    });
} catch (err) {
    console.log(`refused: ${err.message.trim()} — if BadCertificateUntrusted, the appliance's administrator`
        + " moves this client's certificate from pki/rejected/ to pki/trusted/; then run again");
    await client.disconnect();
    process.exit(1);
}

const ns = await session.readNamespaceArray();
const mv = ns.indexOf("http://opcfoundation.org/UA/MachineVision");
const app = ns.indexOf("urn:defect-appliance:opcua");
const node = async (path) =>
    (await session.translateBrowsePath(makeBrowsePath("ObjectsFolder", path))).targets[0].targetId;
const visionSystem = await node(`/${mv}:VisionSystem`);
const automatic = await node(`/${mv}:VisionSystem/${mv}:VisionStateMachine/${mv}:AutomaticModeStateMachine`);
const startSingleJob = await node(`/${mv}:VisionSystem/${mv}:VisionStateMachine/${mv}:AutomaticModeStateMachine/${mv}:StartSingleJob`);
const partIdInput = await node(`/${mv}:VisionSystem/${app}:Inputs/${app}:PartId`);

// events: select the fields by browse name (Machine Vision namespace)
const fields = ["Time", `${mv}:ResultId`, `${mv}:JobId`, `${mv}:ResultState`, `${mv}:ResultContent`];
const subscription = await session.createSubscription2({ requestedPublishingInterval: 10, publishingEnabled: true });
const item = ClientMonitoredItem.create(subscription, { nodeId: visionSystem, attributeId: AttributeIds.EventNotifier },
    { samplingInterval: 0, queueSize: 100, filter: constructEventFilter(fields) }, TimestampsToReturn.Both);
const received = new Promise((resolve) => item.once("changed", resolve));

// the part's id, then one job; the result arrives as an event
await session.write({ nodeId: partIdInput, attributeId: AttributeIds.Value,
    value: { value: { dataType: DataType.String, value: "SN-000123" } } });
const call = await session.call({ objectId: automatic, methodId: startSingleJob, inputArguments: [
    { dataType: DataType.ExtensionObject, value: null }, { dataType: DataType.ExtensionObject, value: null },
    { dataType: DataType.ExtensionObject, value: null }, { dataType: DataType.ExtensionObject, value: null },
    { dataType: DataType.Variant, arrayType: VariantArrayType.Array, value: [] },
] });
if (call.statusCode.name === "Good") {
    console.log("StartSingleJob: Good, jobId", call.outputArguments[0].value.id);
} else {  // e.g. BadInvalidState: the camera runs free (the demo); its next result comes anyway
    console.log("StartSingleJob:", call.statusCode.name);
}

const [time, resultId, jobId, state, content] = await received;
const defect = content.value[0]; // DefectResultDataType, decoded from the server's DataTypeDefinition
console.log(JSON.stringify({
    time: time.value, resultId: resultId.value.id, jobId: jobId.value.id, resultState: state.value,
    partId: defect.partId, disposition: defect.disposition, dispositionCode: defect.dispositionCode,
    defectType: defect.defectType, severity: defect.severity, confidence: defect.confidence,
    modelVersion: defect.modelVersion,
}, null, 2));

await subscription.terminate();
await session.close();
await client.disconnect();
await certificateManager.dispose();
