/**
 * The monitoring kit in deploy/: the Prometheus rules pass promtool's checks and unit tests,
 * and the Grafana dashboard's every query returns series from a real Prometheus (Debian's
 * `prometheus`) scraping a real reaperd over its loopback TCP listener with the bearer token,
 * after real activity: engines registered, heartbeats accepted and refused, a time-based
 * expiry, a clean and a partial force-reap, a request with a wrong token, a SIGSTOP stall and
 * an orphan path. The rules are loaded by that Prometheus too, evaluate without error, and
 * the alerts this activity should raise fire.
 */
import assert from "node:assert/strict";
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { chmodSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { request } from "node:http";
import { createServer, type AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import { exited, sleeper, spawnDaemon, startEngine, tempDir, until, writeDaemonConfig } from "../helpers.js";

const ROOT = fileURLToPath(new URL("../../../", import.meta.url));
const RULES = join(ROOT, "deploy/prometheus/session-reaper.rules.yml");
const RULE_TESTS = join(ROOT, "deploy/prometheus/session-reaper.rules.test.yml");
const DASHBOARD = join(ROOT, "deploy/grafana/session-reaper.json");
const JOB = "session-reaper";
const TOKEN = "monitoring-test-token-0123456789abcdef0123456789";

/** A port nobody listens on right now. */
function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const srv = createServer().listen(0, "127.0.0.1", () => {
      const { port } = srv.address() as AddressInfo;
      srv.close(() => resolve(port));
    });
  });
}

interface HttpAnswer {
  status: number;
  text: string;
}

function http(port: number, method: string, path: string, headers: Record<string, string> = {}, body?: unknown) {
  const payload = body === undefined ? undefined : JSON.stringify(body);
  return new Promise<HttpAnswer>((resolve, reject) => {
    const req = request(
      {
        host: "127.0.0.1",
        port,
        method,
        path,
        headers: { ...(payload === undefined ? {} : { "content-type": "application/json" }), ...headers },
        timeout: 5000,
      },
      (res) => {
        let text = "";
        res.setEncoding("utf8").on("data", (d: string) => (text += d));
        res.on("end", () => resolve({ status: res.statusCode ?? 0, text }));
      },
    );
    req.on("timeout", () => req.destroy(new Error(`${method} ${path}: no answer within 5 s`)));
    req.on("error", reject);
    req.end(payload);
  });
}

/** The daemon's API on loopback TCP, with the bearer token. */
function reaperApi(port: number) {
  return async (method: string, path: string, body?: unknown, token = TOKEN) => {
    const r = await http(port, method, path, { authorization: `Bearer ${token}` }, body);
    return { status: r.status, body: (r.text.startsWith("{") ? JSON.parse(r.text) : {}) as Record<string, unknown> };
  };
}

interface PromSeries {
  metric: Record<string, string>;
  value?: [number, string];
}

/** Prometheus' HTTP API (GET, JSON), its envelope checked. */
async function promApi<T>(port: number, path: string): Promise<T> {
  const r = await http(port, "GET", path);
  const body = JSON.parse(r.text) as { status: string; data: T; error?: string };
  assert.equal(body.status, "success", `${path}: ${r.status} ${body.error ?? r.text.slice(0, 300)}`);
  return body.data;
}

function instantQuery(port: number, expr: string): Promise<{ resultType: string; result: PromSeries[] }> {
  return promApi(port, `/api/v1/query?query=${encodeURIComponent(expr)}`);
}

interface Target {
  panel: string;
  expr: string;
}

interface Panel {
  title?: string;
  type?: string;
  datasource?: { type?: string; uid?: string };
  targets?: { expr?: string; datasource?: { uid?: string } }[];
  panels?: Panel[];
}

/** Every panel target of the dashboard, rows' nested panels included. */
function dashboardTargets(dash: { panels: Panel[] }): Target[] {
  const out: Target[] = [];
  const walk = (panels: Panel[]): void => {
    for (const p of panels) {
      if (p.type !== "row") {
        assert.deepEqual(
          p.datasource,
          { type: "prometheus", uid: "${DS_PROMETHEUS}" },
          `panel ${p.title}'s datasource`,
        );
        assert.ok((p.targets ?? []).length > 0, `panel ${p.title} has targets`);
      }
      for (const t of p.targets ?? []) {
        assert.ok(typeof t.expr === "string" && t.expr.length > 0, `panel ${p.title}: a target without expr`);
        out.push({ panel: p.title ?? "?", expr: t.expr });
      }
      walk(p.panels ?? []);
    }
  };
  walk(dash.panels);
  return out;
}

/**
 * Grafana's variables, as Grafana would render them for a 1 s scrape interval and this
 * target; a variable the test does not know fails the test rather than reach Prometheus.
 */
function render(expr: string, vars: Record<string, string>): string {
  const out = expr.replace(
    /\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)/g,
    (whole, a?: string, b?: string, c?: string) => {
      const name = a ?? b ?? c ?? "";
      const v = vars[name];
      assert.ok(v !== undefined, `unknown dashboard variable ${whole} in ${expr}`);
      return v;
    },
  );
  return out;
}

/** Metric names an expression reads (the project's and the process collector's; `up`). */
function metricNames(expr: string): string[] {
  const names = expr.match(/\b(?:session_reaper[a-z_:]*|process_[a-z_]+|nodejs_[a-z_]+|up)\b(?=\s*[{[)]|\s*$)/g);
  return [...new Set(names ?? [])];
}

function ruleNames(yaml: string): { groups: string[]; rules: string[] } {
  return {
    groups: [...yaml.matchAll(/^ {2}- name: (\S+)\s*$/gm)].map((m) => m[1] as string),
    rules: [...yaml.matchAll(/^ {6}- (?:alert|record): (\S+)\s*$/gm)].map((m) => m[1] as string),
  };
}

test("promtool: the rules are valid and their unit tests pass", { timeout: 30_000 }, (t) => {
  for (const args of [
    ["check", "rules", RULES],
    ["test", "rules", RULE_TESTS],
  ]) {
    const started = Date.now();
    const r = spawnSync("promtool", args, { encoding: "utf8", timeout: 20_000 });
    assert.equal(r.error, undefined, `promtool ${args.join(" ")}: ${String(r.error)}`);
    assert.equal(r.status, 0, `promtool ${args.join(" ")} exited ${r.status}:\n${r.stdout}\n${r.stderr}`);
    assert.match(r.stdout + r.stderr, /SUCCESS/);
    t.diagnostic(`promtool ${args.join(" ")}: ${Date.now() - started} ms`);
  }
});

test(
  "a real Prometheus scraping a real daemon over TCP: every dashboard query returns series, the rules load and fire",
  { timeout: 60_000 },
  async (t) => {
    const started = Date.now();
    const dir = tempDir(t, "sr-monitoring-");
    const reaperPort = await freePort();
    let promPort = await freePort();
    while (promPort === reaperPort) promPort = await freePort();
    const tokenFile = join(dir, "api-token");
    writeFileSync(tokenFile, TOKEN + "\n", { mode: 0o600 });
    chmodSync(tokenFile, 0o600);
    // A leftover path no session claims: the orphan sweep (report mode) finds it at start.
    mkdirSync(join(dir, "leftover-1"));
    const uid = process.getuid?.() ?? 0;
    const { file, socket } = writeDaemonConfig(
      dir,
      `[api.tcp]
listen = "127.0.0.1:${reaperPort}"
token_file = "${tokenFile}"
[profiles.default]
grace_period_sec = 1
step_timeout_sec = 5
allowed_roots = ["${dir}"]
[profiles.default.orphans]
mode = "report"
uids = [${uid}]
min_age_sec = 0
paths = ["${dir}/leftover-*"]
# A release hook that always fails: its sessions' reaps finish partial.
[profiles.hooked]
release_hooks = [["/bin/false"]]
`,
    );
    const daemon = await spawnDaemon(t, file, socket);
    const daemonPid = daemon.proc.pid as number;
    const api = reaperApi(reaperPort);

    // Prometheus, in a temp dir of its own, removed after it is killed.
    const promDir = mkdtempSync(join(tmpdir(), "sr-prometheus-"));
    writeFileSync(
      join(promDir, "prometheus.yml"),
      `global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - ${JSON.stringify(RULES)}
scrape_configs:
  - job_name: ${JOB}
    authorization:
      type: Bearer
      credentials_file: ${JSON.stringify(tokenFile)}
    static_configs:
      - targets: ["127.0.0.1:${reaperPort}"]
`,
    );
    const prom: ChildProcess = spawn(
      "prometheus",
      [
        `--config.file=${join(promDir, "prometheus.yml")}`,
        `--storage.tsdb.path=${join(promDir, "data")}`,
        `--web.listen-address=127.0.0.1:${promPort}`,
        "--log.level=warn",
      ],
      { stdio: ["ignore", "pipe", "pipe"] },
    );
    let promLog = "";
    const keep = (d: string): void => void (promLog = (promLog + d).slice(-8000));
    prom.stdout?.setEncoding("utf8").on("data", keep);
    prom.stderr?.setEncoding("utf8").on("data", keep);
    t.after(async () => {
      prom.kill("SIGKILL");
      await exited(prom);
      rmSync(promDir, { recursive: true, force: true });
    });

    // Activity, all over loopback TCP with the token. A: an engine with a port and a path,
    // heartbeats, force-reaped (clean). B: heartbeat timeout 1 s (a time-based expiry, so a
    // detection lag). C: the hooked profile, force-reaped (partial). Then heartbeats to A (409)
    // and to nobody (404), and a request with a wrong token (401 before any route).
    const engineDir = join(dir, "engine-a");
    const a = await startEngine(t, [], engineDir);
    let r = await api("POST", "/v1/sessions", {
      id: "mon-a",
      engine: { pid: a.pid },
      ports: [a.port],
      paths: [engineDir],
    });
    assert.equal(r.status, 201, JSON.stringify(r.body));
    for (let i = 0; i < 3; i++) assert.equal((await api("POST", "/v1/sessions/mon-a/heartbeat")).status, 200);
    const b = sleeper(t);
    r = await api("POST", "/v1/sessions", { id: "mon-b", engine: { pid: b.pid }, heartbeatTimeoutSec: 1 });
    assert.equal(r.status, 201, JSON.stringify(r.body));
    const c = sleeper(t);
    r = await api("POST", "/v1/sessions", { id: "mon-c", profile: "hooked", engine: { pid: c.pid } });
    assert.equal(r.status, 201, JSON.stringify(r.body));
    assert.equal((await api("POST", "/v1/sessions/mon-a/reap")).status, 202);
    assert.equal((await api("POST", "/v1/sessions/mon-c/reap")).status, 202);
    const reaped = async (id: string) => (await api("GET", `/v1/sessions/${id}`)).body.state === "reaped";
    await until(
      async () => (await reaped("mon-a")) && (await reaped("mon-b")) && (await reaped("mon-c")),
      15_000,
      "reaps",
    );
    const outcomes = await Promise.all(
      ["mon-a", "mon-b", "mon-c"].map(async (id) => (await api("GET", `/v1/sessions/${id}`)).body),
    );
    assert.deepEqual(
      outcomes.map((s) => [s.reason, s.outcome]),
      [
        ["forced", "clean"],
        ["heartbeat_timeout", "clean"],
        ["forced", "partial"],
      ],
    );
    assert.equal((await api("POST", "/v1/sessions/mon-a/heartbeat")).status, 409);
    assert.equal((await api("POST", "/v1/sessions/nobody/heartbeat")).status, 404);
    assert.equal((await api("GET", "/v1/daemon", undefined, TOKEN.replace(/.$/, "x"))).status, 401);
    // A stall of the event loop (SIGSTOP, as a VM freeze would), counted once the loop runs.
    process.kill(daemonPid, "SIGSTOP");
    await new Promise((res) => setTimeout(res, 1500));
    process.kill(daemonPid, "SIGCONT");
    await until(
      async () =>
        /^session_reaper_stalls_total\{cause="loop"\} [1-9]/m.test(
          (await http(reaperPort, "GET", "/metrics", { authorization: `Bearer ${TOKEN}` })).text,
        ),
      10_000,
      "the stall counted",
    );
    t.diagnostic(`daemon up and activity done after ${Date.now() - started} ms`);

    // Prometheus scrapes the daemon with the token.
    await until(
      async () => {
        if (prom.exitCode !== null) throw new Error(`prometheus exited with ${prom.exitCode}: ${promLog}`);
        try {
          const up = await instantQuery(promPort, `up{job="${JOB}"}`);
          return up.result.length === 1 && up.result[0]?.value?.[1] === "1";
        } catch {
          return false; // not listening yet
        }
      },
      20_000,
      "Prometheus scraping the daemon",
    ).catch((err: Error) => assert.fail(`${err.message}; prometheus log: ${promLog}`));
    t.diagnostic(`target up after ${Date.now() - started} ms`);

    // Every panel query, with Grafana's variables for this target, returns series (retried
    // until rate windows hold two samples of every series).
    const dash = JSON.parse(readFileSync(DASHBOARD, "utf8")) as {
      __inputs: { name: string; type: string; pluginId: string }[];
      panels: Panel[];
      templating: { list: { name: string; query: { query: string } | string }[] };
    };
    assert.deepEqual(
      dash.__inputs.map((i) => [i.name, i.type, i.pluginId]),
      [["DS_PROMETHEUS", "datasource", "prometheus"]],
    );
    const vars: Record<string, string> = {
      DS_PROMETHEUS: "prometheus",
      job: JOB,
      instance: `127.0.0.1:${reaperPort}`,
      __interval: "2s",
      __rate_interval: "10s",
      __range: "5m",
    };
    const targets = dashboardTargets(dash);
    assert.ok(targets.length >= 20, `${targets.length} panel targets`);
    const empty = async (): Promise<string[]> => {
      const missing: string[] = [];
      for (const { panel, expr } of targets) {
        const res = await instantQuery(promPort, render(expr, vars));
        if (res.result.length === 0) missing.push(`${panel}: ${expr}`);
      }
      return missing;
    };
    let missing: string[] = [];
    await until(async () => (missing = await empty()).length === 0, 20_000, "series for every panel").catch(
      () => undefined,
    );
    assert.deepEqual(missing, [], "dashboard queries without series");
    t.diagnostic(`${targets.length} panel queries returned series after ${Date.now() - started} ms`);

    // Every metric a query reads exists (a query may show 0 when a counter never moved, so a
    // misspelt name must not hide behind a fallback): the target's metadata, which lists
    // families that have no sample yet, or a recording rule.
    const rulesYaml = readFileSync(RULES, "utf8");
    const { groups, rules } = ruleNames(rulesYaml);
    const metadata = await promApi<Record<string, unknown>>(promPort, "/api/v1/metadata");
    const known = (name: string): boolean =>
      name === "up" || rules.includes(name) || name in metadata || name.replace(/_(bucket|count|sum)$/, "") in metadata;
    for (const { panel, expr } of targets) {
      for (const name of metricNames(expr)) assert.ok(known(name), `panel ${panel}: unknown metric ${name}`);
    }

    // The variables' own queries: label_values(selector, label) finds this target.
    for (const v of dash.templating.list) {
      const q = typeof v.query === "string" ? v.query : v.query.query;
      const m = /^label_values\((.+),\s*(\w+)\)$/.exec(q);
      assert.ok(m, `variable ${v.name}: ${q}`);
      const res = await instantQuery(promPort, render(m[1] as string, vars));
      assert.ok(
        res.result.some((s) => s.metric[m[2] as string] === vars[v.name]),
        `variable ${v.name} offers ${vars[v.name]}`,
      );
    }

    // The rules: every group loaded, every rule evaluated without error.
    type Rule = { name: string; health: string; lastError?: string; type: string };
    await until(
      async () => {
        const data = await promApi<{ groups: { name: string; rules: Rule[] }[] }>(promPort, "/api/v1/rules");
        return data.groups.every((g) => g.rules.every((rule) => rule.health === "ok"));
      },
      10_000,
      "every rule evaluated",
    );
    const loaded = await promApi<{ groups: { name: string; file: string; rules: Rule[] }[] }>(
      promPort,
      "/api/v1/rules",
    );
    // (Prometheus lists groups by name.)
    assert.deepEqual(loaded.groups.map((g) => g.name).sort(), [...groups].sort());
    assert.deepEqual(loaded.groups.flatMap((g) => g.rules.map((rule) => rule.name)).sort(), [...rules].sort());
    for (const g of loaded.groups) {
      for (const rule of g.rules) assert.equal(rule.health, "ok", `${g.name}/${rule.name}: ${rule.lastError ?? ""}`);
    }

    // What this activity must raise, with its labels.
    const expected = [
      `SessionReaperHeartbeatsRefused{status="404"}`,
      `SessionReaperHeartbeatsRefused{status="409"}`,
      `SessionReaperTcpRefused{status="401"}`,
      `SessionReaperReapsPartial{outcome="partial",reason="forced"}`,
      `SessionReaperStalled{cause="loop"}`,
    ];
    let firing: string[] = [];
    const key = ({ labels }: { labels: Record<string, string> }): string => {
      const shown = ["cause", "outcome", "reason", "status"].filter((k) => labels[k] !== undefined);
      return `${labels.alertname}{${shown.map((k) => `${k}="${labels[k]}"`).join(",")}}`;
    };
    await until(
      async () => {
        const data = await promApi<{ alerts: { labels: Record<string, string>; state: string }[] }>(
          promPort,
          "/api/v1/alerts",
        );
        firing = data.alerts.filter((a) => a.state === "firing" && a.labels.job === JOB).map(key);
        return expected.every((e) => firing.includes(e));
      },
      10_000,
      "the expected alerts firing",
    ).catch(() => undefined);
    for (const e of expected) assert.ok(firing.includes(e), `${e} firing; firing: ${firing.join(" ")}`);
    assert.ok(!firing.some((f) => f.startsWith("SessionReaperReapsFailed")), firing.join(" "));
    t.diagnostic(`rules loaded and alerts firing after ${Date.now() - started} ms: ${firing.join(" ")}`);
  },
);
