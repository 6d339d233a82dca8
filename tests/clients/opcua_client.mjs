// An independent OPC UA client (node-opcua) acting as the PLC/SCADA side of the integration test.
//
//   node opcua_client.mjs '<json settings>'
//
// Settings: url, pki (a folder for this client's own PKI), serverCert (the server's DER
// certificate, which this client trusts explicitly), operator/reader ({user, password}),
// inputs ({partId, batch, processValueNames, processValues}), argPartId, timeoutMs.
//
// It prints "STEP <name> <detail>" lines while it works, then one "RESULT <json>" line, and
// exits non-zero if a check it can judge by itself failed (the JSON says which).
//
// Flow: (1) connect as the operator with SignAndEncrypt; the server does not know this client's
// certificate yet and refuses, putting it in its rejected/ folder; the test moves it to trusted/
// (what an administrator does) and this client retries until the session opens. (2) Browse the
// VisionSystem, subscribe to ResultReadyEvents on the VisionSystem and on the Server object,
// write the part inputs, call StartSingleJob twice and collect the events with their decoded
// ResultContent; read and follow the Health warnings while the test raises them (on "STEP
// health-subscribed"). (3) The reader may read but not call or write; anonymous and None-security
// sessions are refused.

import { createRequire } from "node:module";
import { readFileSync } from "node:fs";

const require = createRequire(import.meta.url);
const opcua = require("node-opcua-client");
const { OPCUACertificateManager } = require("node-opcua-certificate-manager");
const {
    OPCUAClient, MessageSecurityMode, SecurityPolicy, UserTokenType, AttributeIds, DataType, VariantArrayType,
    constructEventFilter, ClientMonitoredItem, TimestampsToReturn, makeBrowsePath, StatusCodes, EndpointDescription,
    UserTokenPolicy,
} = opcua;

const settings = JSON.parse(process.argv[2]);
const timeoutMs = settings.timeoutMs ?? 20000;
const failures = [];
const result = { failures };
const MV = "http://opcfoundation.org/UA/MachineVision";
const APP = "urn:defect-appliance:opcua";
const EVENT_FIELDS = ["EventId", "EventType", "SourceName", "Time", "Message", "Severity"];
const MV_FIELDS = ["ResultId", "ResultState", "IsPartial", "IsSimulated", "JobId", "CreationTime", "PartId",
    "InternalRecipeId", "InternalConfigurationId", "ProcessingTimes", "ResultContent"];

const step = (name, detail = "") => console.log(`STEP ${name} ${detail}`);
const check = (ok, what) => { if (!ok) failures.push(what); return ok; };
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function plain(value) {
    return JSON.parse(JSON.stringify(value ?? null, (_key, v) => {
        if (typeof v === "bigint") return v.toString();
        if (v && v.type === "Buffer" && Array.isArray(v.data)) return Buffer.from(v.data).toString("hex");
        return v;
    }));
}

function describe(variant) {
    return {
        dataType: DataType[variant.dataType],
        array: variant.arrayType !== VariantArrayType.Scalar,
        value: plain(variant.value),
        decoded: variant.value?.constructor?.name !== "OpaqueStructure"
            && !(Array.isArray(variant.value) && variant.value[0]?.constructor?.name === "OpaqueStructure"),
    };
}

const certificateManager = new OPCUACertificateManager({
    rootFolder: settings.pki, automaticallyAcceptUnknownCertificate: false,
});

function makeClient(securityMode, securityPolicy) {
    return OPCUAClient.create({
        applicationName: "appliance-test-plc",
        clientCertificateManager: certificateManager,
        securityMode, securityPolicy,
        endpointMustExist: false,
        keepSessionAlive: false,
        requestedSessionTimeout: 60000,
        connectionStrategy: { maxRetry: 0, initialDelay: 100, maxDelay: 200 },
    });
}

const identity = ({ user, password }) => ({ type: UserTokenType.UserName, userName: user, password });
const errorText = (err) => `${err?.message ?? err}`.split("\n")[0];

async function secureSession(user) {
    const client = makeClient(MessageSecurityMode.SignAndEncrypt, SecurityPolicy.Basic256Sha256);
    await client.connect(settings.url);
    try {
        return { client, session: await client.createSession(identity(user)) };
    } catch (err) {
        await client.disconnect();
        throw err;
    }
}

async function resolve(session, root, path) {
    const res = await session.translateBrowsePath(makeBrowsePath(root, path));
    if (!res.statusCode.equals(StatusCodes.Good)) throw new Error(`${path}: ${res.statusCode.name}`);
    return res.targets[0].targetId.toString();
}

async function argumentTypes(session, methodId) {
    const inputs = await resolve(session, methodId, "/InputArguments");
    const [dv] = await session.read([{ nodeId: inputs, attributeId: AttributeIds.Value }]);
    return dv.value.value.map((arg) => arg.dataType);
}

async function main() {
    await certificateManager.initialize();
    await certificateManager.trustCertificate(readFileSync(settings.serverCert));

    // (1) certificate trust: refused first, accepted once the test has trusted our certificate
    let operator;
    const started = Date.now();
    for (let attempt = 0; ; attempt++) {
        try {
            operator = await secureSession(settings.operator);
            break;
        } catch (err) {
            if (attempt === 0) {
                result.firstAttempt = errorText(err);
                step("rejected", result.firstAttempt);
            }
            if (Date.now() - started > timeoutMs) throw new Error(`never trusted: ${errorText(err)}`);
            await sleep(250);
        }
    }
    const { client, session } = operator;
    result.securityPolicy = client.securityPolicy;
    result.securityMode = MessageSecurityMode[client.securityMode];
    step("connected", `${result.securityMode} ${result.securityPolicy}`);

    // (2) browse
    const namespaces = await session.readNamespaceArray();
    const mv = namespaces.indexOf(MV);
    const app = namespaces.indexOf(APP);
    check(mv > 0 && app > 0, "namespaces missing");
    const vs = await resolve(session, "ObjectsFolder", `/${mv}:VisionSystem`);
    const browsed = await session.browse(vs);
    result.visionSystemChildren = browsed.references.map((r) => `${namespaces[r.browseName.namespaceIndex]}|${r.browseName.name}`);
    const auto = await resolve(session, vs, `/${mv}:VisionStateMachine/${mv}:AutomaticModeStateMachine`);
    const node = async (path) => resolve(session, vs, path);
    const ids = {
        startSingleJob: await node(`/${mv}:VisionStateMachine/${mv}:AutomaticModeStateMachine/${mv}:StartSingleJob`),
        state: await node(`/${mv}:VisionStateMachine/CurrentState`),
        autoState: await node(`/${mv}:VisionStateMachine/${mv}:AutomaticModeStateMachine/CurrentState`),
        getResultById: await node(`/${mv}:ResultManagement/${mv}:GetResultById`),
        vsm: await node(`/${mv}:VisionStateMachine`),
        halt: await node(`/${mv}:VisionStateMachine/${mv}:Halt`),
        reset: await node(`/${mv}:VisionStateMachine/${mv}:Reset`),
        resultManagement: await node(`/${mv}:ResultManagement`),
    };
    for (const name of ["PartId", "Batch", "ProcessValueNames", "ProcessValues", "Trigger"]) {
        ids[`input${name}`] = await node(`/${app}:Inputs/${app}:${name}`);
    }
    for (const name of ["Sequence", "PartId", "Batch", "Disposition", "DispositionCode", "DefectType",
        "Severity", "SeverityCode", "Confidence", "ModelVersion", "Content"]) {
        ids[`latest${name}`] = await node(`/${app}:LatestResult/${app}:${name}`);
    }
    const [state] = await session.read([{ nodeId: ids.state, attributeId: AttributeIds.Value }]);
    result.stateBefore = state.value.value?.text;
    step("browsed", result.visionSystemChildren.join(","));

    // events on the VisionSystem and on the Server object
    const fields = [...EVENT_FIELDS, ...MV_FIELDS.map((name) => `${mv}:${name}`)];
    const filter = constructEventFilter(fields);
    const subscription = await session.createSubscription2({
        requestedPublishingInterval: 10, requestedLifetimeCount: 600, requestedMaxKeepAliveCount: 20,
        maxNotificationsPerPublish: 100, publishingEnabled: true, priority: 1,
    });
    const events = { VisionSystem: [], Server: [] };
    for (const [name, nodeId] of [["VisionSystem", vs], ["Server", "ns=0;i=2253"]]) {
        const item = ClientMonitoredItem.create(subscription, { nodeId, attributeId: AttributeIds.EventNotifier },
            { samplingInterval: 0, queueSize: 100, filter }, TimestampsToReturn.Both);
        item.on("changed", (variants) => {
            const event = {};
            fields.forEach((f, i) => { event[f.replace(/^\d+:/, "")] = describe(variants[i]); });
            events[name].push(event);
        });
    }
    await sleep(200);

    // write the part inputs, then two single jobs: one with the inputs, one with a partId argument
    const write = async (s, nodeId, dataType, value, arrayType = VariantArrayType.Scalar) =>
        (await s.write({ nodeId, attributeId: AttributeIds.Value, value: { value: { dataType, arrayType, value } } })).name;
    const inputs = settings.inputs;
    result.inputWrites = {
        partId: await write(session, ids.inputPartId, DataType.String, inputs.partId),
        batch: await write(session, ids.inputBatch, DataType.String, inputs.batch),
        names: await write(session, ids.inputProcessValueNames, DataType.String, inputs.processValueNames, VariantArrayType.Array),
        values: await write(session, ids.inputProcessValues, DataType.Double, inputs.processValues, VariantArrayType.Array),
        wrongType: await write(session, ids.inputPartId, DataType.Double, 3.5),
    };
    const nullArgs = [
        { dataType: DataType.ExtensionObject, value: null }, { dataType: DataType.ExtensionObject, value: null },
        { dataType: DataType.ExtensionObject, value: null }, { dataType: DataType.ExtensionObject, value: null },
        { dataType: DataType.Variant, arrayType: VariantArrayType.Array, value: [] },
    ];
    const call = async (s, args) => s.call({ objectId: auto, methodId: ids.startSingleJob, inputArguments: args });
    const jobs = [];
    const first = await call(session, nullArgs);
    jobs.push({ status: first.statusCode.name, out: first.outputArguments?.map(describe) });
    const [, partIdType] = await argumentTypes(session, ids.startSingleJob);
    const partIdArg = await session.constructExtensionObject(partIdType, { id: settings.argPartId });
    const args2 = [...nullArgs];
    args2[1] = { dataType: DataType.ExtensionObject, value: partIdArg };
    const second = await call(session, args2);
    jobs.push({ status: second.statusCode.name, out: second.outputArguments?.map(describe) });
    result.jobs = jobs;
    step("jobs", jobs.map((j) => j.status).join(","));

    const waitEvents = async (count) => {
        const until = Date.now() + timeoutMs;
        while ((events.VisionSystem.length < count || events.Server.length < count) && Date.now() < until) await sleep(20);
    };
    await waitEvents(2);

    // a PLC that only writes variables: Trigger = true, which the server sets back to false
    result.trigger = { write: await write(session, ids.inputTrigger, DataType.Boolean, true) };
    await waitEvents(3);
    const [trigger] = await session.read([{ nodeId: ids.inputTrigger, attributeId: AttributeIds.Value }]);
    result.trigger.readBack = trigger.value.value;
    await sleep(100);
    result.events = events;
    check(events.VisionSystem.length === 3, `VisionSystem events: ${events.VisionSystem.length}`);
    check(events.Server.length === 3, `Server events: ${events.Server.length}`);
    for (const event of [...events.VisionSystem, ...events.Server]) {
        for (const [name, v] of Object.entries(event)) {
            check(v.dataType !== "Null" && v.value !== null, `event field ${name} is null`);
            check(v.decoded, `event field ${name} not decoded`);
        }
    }
    step("events", `${events.VisionSystem.length}+${events.Server.length}`);

    // the vision state machine: Halt refuses jobs until Reset
    const readState = async () => (await session.read([{ nodeId: ids.state, attributeId: AttributeIds.Value }]))[0].value.value?.text;
    const method = async (methodId) => (await session.call({ objectId: ids.vsm, methodId, inputArguments: [] })).statusCode.name;
    result.halt = { halt: await method(ids.halt), state: await readState() };
    result.halt.startSingleJob = (await call(session, nullArgs)).statusCode.name;
    result.halt.reset = await method(ids.reset);
    result.halt.stateAfterReset = await readState();

    // plain variables, result management
    const latestNames = Object.keys(ids).filter((k) => k.startsWith("latest"));
    const latestValues = await session.read(latestNames.map((k) => ({ nodeId: ids[k], attributeId: AttributeIds.Value })));
    result.latest = Object.fromEntries(latestNames.map((k, i) => [k.slice(6), describe(latestValues[i].value)]));
    const [autoState] = await session.read([{ nodeId: ids.autoState, attributeId: AttributeIds.Value }]);
    result.autoState = autoState.value.value?.text;
    const lastId = events.VisionSystem.at(-1)?.ResultId?.value?.id;
    const [resultIdType] = await argumentTypes(session, ids.getResultById);
    const byId = await session.call({
        objectId: ids.resultManagement, methodId: ids.getResultById,
        inputArguments: [
            { dataType: DataType.ExtensionObject, value: await session.constructExtensionObject(resultIdType, { id: lastId }) },
            { dataType: DataType.Int32, value: 0 },
        ],
    });
    result.getResultById = { status: byId.statusCode.name, out: byId.outputArguments?.map(describe) };

    // health warnings (Modbus status bits 8 and 9): read, then follow them while the test raises both
    const healthNames = ["ImageWarning", "ImageWarningReason", "QualityAlarm", "QualityAlarmReason"];
    const healthIds = {};
    for (const name of healthNames) healthIds[name] = await node(`/${app}:Health/${app}:${name}`);
    const readHealth = async () => {
        const values = await session.read(healthNames.map((n) => ({ nodeId: healthIds[n], attributeId: AttributeIds.Value })));
        return Object.fromEntries(healthNames.map((n, i) => [n, describe(values[i].value)]));
    };
    result.health = { before: await readHealth(), changes: [] };
    const healthSubscription = await session.createSubscription2({
        requestedPublishingInterval: 50, requestedLifetimeCount: 600, requestedMaxKeepAliveCount: 20,
        maxNotificationsPerPublish: 100, publishingEnabled: true, priority: 1,
    });
    for (const name of healthNames) {
        const item = ClientMonitoredItem.create(healthSubscription, { nodeId: healthIds[name], attributeId: AttributeIds.Value },
            { samplingInterval: 0, queueSize: 10, discardOldest: true }, TimestampsToReturn.Both);
        item.on("changed", (dv) => result.health.changes.push([name, plain(dv.value.value)]));
    }
    await sleep(300);
    step("health-subscribed");  // the test raises both warnings now
    const raised = (name) => result.health.changes.some(([n, v]) => n === name && v === true);
    const until = Date.now() + timeoutMs;
    while (!(raised("ImageWarning") && raised("QualityAlarm")) && Date.now() < until) await sleep(20);
    await sleep(300);  // the reasons come with the same update
    result.health.after = await readHealth();
    result.health.write = await write(session, healthIds.ImageWarning, DataType.Boolean, false);
    await healthSubscription.terminate();
    check(raised("ImageWarning") && raised("QualityAlarm"), "health warnings never seen raised");
    step("health", JSON.stringify(result.health.after));

    // (3) roles and refused sessions
    const reader = await client.createSession(identity(settings.reader));
    const [readerRead] = await reader.read([{ nodeId: ids.latestSequence, attributeId: AttributeIds.Value }]);
    result.reader = {
        read: readerRead.statusCode.name,
        call: (await call(reader, nullArgs)).statusCode.name,
        write: await write(reader, ids.inputPartId, DataType.String, "not-allowed"),
        trigger: await write(reader, ids.inputTrigger, DataType.Boolean, true),
    };
    await reader.close();

    // What the server offers: SignAndEncrypt endpoints with username tokens only.  node-opcua (like any
    // conforming client) then refuses None security and anonymous logins by itself; to see the
    // *server* refuse them, the client is made to pretend those endpoints exist (private field).
    result.endpoints = client._serverEndpoints.map((e) => ({
        mode: MessageSecurityMode[e.securityMode], policy: e.securityPolicyUri.split("#")[1],
        tokens: e.userIdentityTokens.map((t) => `${UserTokenType[t.tokenType]}:${(t.securityPolicyUri ?? "").split("#")[1] ?? ""}`),
    }));
    for (const endpoint of client._serverEndpoints) {
        endpoint.userIdentityTokens.push(new UserTokenPolicy({ policyId: "anonymous", tokenType: UserTokenType.Anonymous }));
    }
    try {
        const anonymous = await client.createSession();
        result.anonymous = "accepted";
        await anonymous.close();
    } catch (err) {
        result.anonymous = errorText(err);
    }
    await subscription.terminate();
    await session.close();
    await client.disconnect();

    const insecure = makeClient(MessageSecurityMode.None, SecurityPolicy.None);
    try {
        await insecure.connect(settings.url);
        const real = insecure._serverEndpoints[0];
        insecure._serverEndpoints.push(new EndpointDescription({
            ...real, securityMode: MessageSecurityMode.None, securityPolicyUri: SecurityPolicy.None,
        }));
        const s = await insecure.createSession(identity(settings.operator));
        result.noneSecurity = "accepted";
        await s.close();
    } catch (err) {
        result.noneSecurity = errorText(err);
    } finally {
        await insecure.disconnect();
    }
    check(result.anonymous !== "accepted", "anonymous session accepted");
    check(result.noneSecurity !== "accepted", "None-security session accepted");
    check(result.reader.call === "BadUserAccessDenied", `reader call: ${result.reader.call}`);
    check(result.reader.write === "BadUserAccessDenied", `reader write: ${result.reader.write}`);
}

try {
    await main();
} catch (err) {
    failures.push(`exception: ${err?.stack ?? err}`);
}
await certificateManager.dispose?.();
console.log(`RESULT ${JSON.stringify(result)}`);
process.exit(failures.length ? 1 : 0);
