// A fake GitHub REST API for tests: node:http on 127.0.0.1, a small router table, state in
// plain objects. Implements the self-hosted runner registration-token endpoints today; add
// routes (JIT config, runner list/delete, queued jobs, webhooks) to ROUTES as tests need them.
import { createServer, type IncomingMessage, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";

export interface RecordedRequest {
  method: string;
  path: string;
  headers: Record<string, string | string[] | undefined>;
  body: string;
}

export interface FakeGitHubState {
  /** Accepted credential (as "token X" or "Bearer X"). */
  token: string;
  /** Known repositories ("owner/repo") and organizations; others answer 404. */
  repos: Set<string>;
  orgs: Set<string>;
  /** Value handed out by the registration-token endpoints. */
  registrationToken: string;
  /** How many registration tokens were issued, per "owner/repo" or org. */
  issued: Record<string, number>;
}

export interface FakeGitHubOptions {
  token?: string;
  repos?: string[];
  orgs?: string[];
  registrationToken?: string;
}

export interface FakeGitHub {
  /** Base URL, e.g. http://127.0.0.1:PORT (use as GITHUB_API_URL). */
  url: string;
  requests: RecordedRequest[];
  state: FakeGitHubState;
  /** The credential the fake accepts (state.token); put it in GITHUB_TOKEN. */
  readonly validToken: string;
  /** Token the registration endpoints return (shortcut for state.registrationToken). */
  registrationToken: string;
  /** Forces `status`/`body` for requests whose path matches; `times` limits how often (default: always). */
  respondWith(path: RegExp, status: number, body?: unknown, opts?: { method?: string; times?: number; headers?: Record<string, string> }): void;
  close(): Promise<void>;
}

interface Ctx {
  req: IncomingMessage;
  params: string[];
  body: string;
  state: FakeGitHubState;
}

interface Reply {
  status: number;
  body?: unknown;
  headers?: Record<string, string>;
}

interface Route {
  method: string;
  pattern: RegExp;
  /** Whether the route needs a valid credential (all real endpoints here do). */
  auth: boolean;
  handle(ctx: Ctx): Reply;
}

const DOCS = "https://docs.github.com/rest";

function notFound(): Reply {
  return { status: 404, body: { message: "Not Found", documentation_url: DOCS, status: "404" } };
}

function registrationToken(state: FakeGitHubState, key: string): Reply {
  state.issued[key] = (state.issued[key] ?? 0) + 1;
  const expires = new Date(Date.now() + 3600_000).toISOString();
  return { status: 201, body: { token: state.registrationToken, expires_at: expires } };
}

const ROUTES: Route[] = [
  {
    method: "POST",
    pattern: /^\/repos\/([^/]+)\/([^/]+)\/actions\/runners\/registration-token$/,
    auth: true,
    handle: ({ params: [owner, repo], state }) => {
      const key = `${owner}/${repo}`;
      return state.repos.has(key) ? registrationToken(state, key) : notFound();
    },
  },
  {
    method: "POST",
    pattern: /^\/orgs\/([^/]+)\/actions\/runners\/registration-token$/,
    auth: true,
    handle: ({ params: [org], state }) => (state.orgs.has(org ?? "") ? registrationToken(state, org ?? "") : notFound()),
  },
];

interface Override {
  path: RegExp;
  method: string | undefined;
  times: number;
  reply: Reply;
}

function authorized(req: IncomingMessage, token: string): boolean {
  const m = /^(?:token|bearer)\s+(.+)$/i.exec(req.headers.authorization ?? "");
  return m?.[1] === token;
}

function send(res: ServerResponse, reply: Reply): void {
  const text = reply.body === undefined ? "" : JSON.stringify(reply.body);
  res.writeHead(reply.status, {
    "content-type": "application/json; charset=utf-8",
    "x-github-api-version-selected": "2022-11-28",
    ...reply.headers,
  });
  res.end(text);
}

function readBody(req: IncomingMessage): Promise<string> {
  return new Promise((resolve, reject) => {
    let body = "";
    req.setEncoding("utf8");
    req.on("data", (c: string) => (body += c));
    req.on("end", () => resolve(body));
    req.on("error", reject);
  });
}

function dispatch(ctx: Omit<Ctx, "params">, path: string, overrides: Override[]): Reply {
  const method = ctx.req.method ?? "GET";
  const forced = overrides.find((o) => o.times > 0 && o.path.test(path) && (!o.method || o.method === method));
  if (forced) {
    forced.times--;
    return forced.reply;
  }
  for (const route of ROUTES) {
    const m = route.method === method ? route.pattern.exec(path) : null;
    if (!m) continue;
    if (route.auth && !authorized(ctx.req, ctx.state.token)) {
      return { status: 401, body: { message: "Bad credentials", documentation_url: DOCS, status: "401" } };
    }
    return route.handle({ ...ctx, params: m.slice(1).map(decodeURIComponent) });
  }
  return notFound();
}

export async function startFakeGitHub(opts: FakeGitHubOptions = {}): Promise<FakeGitHub> {
  const state: FakeGitHubState = {
    token: opts.token ?? "ghp_fakeTestToken0123456789",
    repos: new Set(opts.repos ?? ["rust-lang-ci/rust"]),
    orgs: new Set(opts.orgs ?? ["rust-lang-ci"]),
    registrationToken: opts.registrationToken ?? "AABBCCDDREGISTRATIONTOKEN",
    issued: {},
  };
  const requests: RecordedRequest[] = [];
  const overrides: Override[] = [];
  const server = createServer((req, res) => {
    void (async () => {
      const body = await readBody(req);
      const path = new URL(req.url ?? "/", "http://fake").pathname;
      requests.push({ method: req.method ?? "GET", path, headers: { ...req.headers }, body });
      send(res, dispatch({ req, body, state }, path, overrides));
    })().catch(() => send(res, { status: 500, body: { message: "fake GitHub failed" } }));
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as AddressInfo;
  return {
    url: `http://127.0.0.1:${port}`,
    requests,
    state,
    get validToken() {
      return state.token;
    },
    get registrationToken() {
      return state.registrationToken;
    },
    set registrationToken(v: string) {
      state.registrationToken = v;
    },
    respondWith(path, status, body, o = {}) {
      const reply: Reply = { status, body: body ?? { message: `forced ${status}`, documentation_url: DOCS } };
      if (o.headers) reply.headers = o.headers;
      overrides.push({ path, method: o.method, times: o.times ?? Infinity, reply });
    },
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}
