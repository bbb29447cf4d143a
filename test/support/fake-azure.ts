// A fake of the two Azure services cloud-init's Azure datasource talks to while it provisions
// a VM, at their real addresses inside a network namespace of the test's own
// (test/support/netns.ts createIsolatedNs), served by this process through unix sockets:
// - the instance metadata service (IMDS), http://169.254.169.254/metadata/instance: the VM's
//   compute metadata (admin user, host name, SSH public keys) and its network (the NIC's MAC);
//   it answers only requests with the `Metadata: true` header, as Azure's does;
// - the wireserver, http://168.63.129.16/machine: the goal state (container and role
//   instance ids) and the health report cloud-init posts when provisioning is done ("report
//   ready"; without it Azure would fail the VM's provisioning).
// Nothing here leaves the namespace and this process.
import { randomUUID } from "node:crypto";
import { createServer, type IncomingMessage, type Server } from "node:http";
import { join } from "node:path";
import { createIsolatedNs, type IsolatedNs } from "./netns.js";

/** The SMBIOS chassis asset tag Azure's VMs carry (how cloud-init's ds-identify knows Azure). */
export const AZURE_CHASSIS_ASSET_TAG = "7783-7084-3265-9085-8269-3286-77";
export const IMDS_ADDR = "169.254.169.254";
export const WIRESERVER_ADDR = "168.63.129.16";

export interface FakeAzureRequest {
  service: "imds" | "wireserver";
  method: string;
  url: string;
  headers: IncomingMessage["headers"];
  body: string;
}

export interface FakeAzure {
  ns: IsolatedNs;
  /** The VM's id in IMDS: boot the VM with it as its SMBIOS uuid (`-uuid`), as Azure does. */
  vmId: string;
  requests: FakeAzureRequest[];
  /** The health reports posted to the wireserver (XML). */
  healthReports(): string[];
  close(): Promise<void>;
}

export interface FakeAzureOptions {
  /** What the VM's user (osProfile.adminUsername) and SSH keys (compute.publicKeys) are. */
  adminUsername: string;
  publicKeys: string[];
  computerName: string;
  /** The NIC's MAC, as QEMU gives it (default 52:54:00:12:34:56, its first NIC's). */
  mac?: string;
  /** More services this process serves inside the namespace: addr:port → 127.0.0.1:port here. */
  expose?: { addr: string; port: number; to: number }[];
}

function body(req: IncomingMessage): Promise<string> {
  return new Promise((resolve) => {
    let b = "";
    req.on("data", (c) => (b += c));
    req.on("end", () => resolve(b));
  });
}

export async function startFakeAzure(o: FakeAzureOptions): Promise<FakeAzure> {
  const ns = createIsolatedNs([IMDS_ADDR, WIRESERVER_ADDR]);
  const requests: FakeAzureRequest[] = [];
  const vmId = randomUUID();
  const containerId = randomUUID();
  const mac = (o.mac ?? "52:54:00:12:34:56").replace(/:/g, "").toUpperCase();
  const servers: Server[] = [];
  const imds = createServer((req, res) => {
    void body(req).then((b) => {
      requests.push({ service: "imds", method: req.method ?? "", url: req.url ?? "", headers: req.headers, body: b });
      if (req.headers.metadata !== "true") return res.writeHead(400, { "content-type": "application/json" }).end('{"error":"Bad request. Required metadata header not specified"}');
      const url = new URL(req.url ?? "/", "http://imds");
      if (url.pathname !== "/metadata/instance") return res.writeHead(404).end();
      res.writeHead(200, { "content-type": "application/json; charset=utf-8" }).end(
        JSON.stringify({
          compute: {
            azEnvironment: "AzurePublicCloud",
            location: "westeurope",
            name: o.computerName,
            osType: "Linux",
            vmId,
            vmSize: "Standard_D2s_v5",
            osProfile: { adminUsername: o.adminUsername, computerName: o.computerName, disablePasswordAuthentication: "true" },
            publicKeys: o.publicKeys.map((k) => ({ keyData: k, path: `/home/${o.adminUsername}/.ssh/authorized_keys` })),
            userData: "",
          },
          network: {
            interface: [
              {
                macAddress: mac,
                ipv4: { ipAddress: [{ privateIpAddress: "10.0.2.15", publicIpAddress: "" }], subnet: [{ address: "10.0.2.0", prefix: "24" }] },
                ipv6: { ipAddress: [] },
              },
            ],
          },
        }),
      );
    });
  });
  const wire = createServer((req, res) => {
    void body(req).then((b) => {
      requests.push({ service: "wireserver", method: req.method ?? "", url: req.url ?? "", headers: req.headers, body: b });
      const url = new URL(req.url ?? "/", "http://wireserver");
      const comp = url.searchParams.get("comp");
      if (req.method === "GET" && comp === "goalstate") {
        return res.writeHead(200, { "content-type": "text/xml; charset=utf-8" }).end(`<?xml version="1.0" encoding="utf-8"?>
<GoalState xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xsi:noNamespaceSchemaLocation="goalstate10.xsd">
  <Version>2012-11-30</Version>
  <Incarnation>1</Incarnation>
  <Machine><ExpectedState>Started</ExpectedState><StopRolesDeadlineHint>300000</StopRolesDeadlineHint><ExpectHealthReport>FALSE</ExpectHealthReport></Machine>
  <Container>
    <ContainerId>${containerId}</ContainerId>
    <RoleInstanceList>
      <RoleInstance>
        <InstanceId>${vmId}.${o.computerName}</InstanceId>
        <State>Started</State>
        <Configuration></Configuration>
      </RoleInstance>
    </RoleInstanceList>
  </Container>
</GoalState>
`);
      }
      if (req.method === "POST" && comp === "health") return res.writeHead(200).end();
      res.writeHead(404).end();
    });
  });
  try {
    for (const [srv, addr, name] of [[imds, IMDS_ADDR, "imds"], [wire, WIRESERVER_ADDR, "wireserver"]] as const) {
      const sock = join(ns.dir, `${name}.sock`);
      await new Promise<void>((resolve, reject) => {
        srv.once("error", reject);
        srv.listen(sock, resolve);
      });
      servers.push(srv);
      await ns.expose(addr, 80, { path: sock });
    }
    for (const e of o.expose ?? []) await ns.expose(e.addr, e.port, { port: e.to });
  } catch (e) {
    for (const srv of servers) srv.close();
    await ns.close();
    throw e;
  }
  return {
    ns,
    vmId,
    requests,
    healthReports: () => requests.filter((r) => r.service === "wireserver" && r.method === "POST").map((r) => r.body),
    close: async () => {
      for (const srv of servers) {
        srv.closeAllConnections();
        await new Promise((r) => srv.close(() => r(undefined)));
      }
      await ns.close();
    },
  };
}
