"""Checks of charts/nerve and systemd/ that need no helm binary, Docker or cluster.

Run by .ci/deploy-checks inside a venv holding .ci/deploy-requirements.txt:

    deploy_checks.py chart                 values, schema, parsing, rendering, RBAC, pod specs
    deploy_checks.py help AGENT SIDECAR    the env vars the chart and units set exist in --help
    deploy_checks.py static BINARY...      the binaries have no ELF interpreter (static)

Every failure is printed with what was expected; the exit code is the number of failures.
"""

import copy
import json
import pathlib
import re
import subprocess
import sys

import jsonschema
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "nerve"
FAILURES = []


def check(condition, message):
    if not condition:
        FAILURES.append(message)
        print(f"FAIL: {message}")
    return condition


def merge(base, override):
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------- parsing every non-template file
def tracked_files():
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout.split()
    return [ROOT / p for p in listed if (ROOT / p).is_file()]


def check_files_parse():
    count = 0
    for path in tracked_files():
        rel = path.relative_to(ROOT)
        if rel.parts[:3] == ("charts", "nerve", "templates"):
            continue  # Go templates, checked by rendering
        try:
            if path.suffix in (".yaml", ".yml"):
                list(yaml.safe_load_all(path.read_text()))
            elif path.suffix == ".json":
                json.loads(path.read_text())
            else:
                continue
            count += 1
        except Exception as e:  # noqa: BLE001 - report any parse error with its file
            check(False, f"{rel} does not parse: {e}")
    print(f"ok: {count} YAML/JSON files parse")


# ---------------------------------------------------------------- values against the schema
# Each of these must be rejected: a wrong type, a wrong enum value or an unknown key.
WRONG_VALUES = [
    {"agent": {"passive": "yes"}},
    {"agent": {"drain": 1}},
    {"agent": {"port": "9739"}},
    {"agent": {"pollInterval": 1}},
    {"agent": {"cordonOn": "spot-interruption"}},
    {"agent": {"cordonOn": ["spot-interuption"]}},
    {"agent": {"cloud": "aliyun"}},
    {"agent": {"resources": {"limits": {"memory": "lots"}}}},
    {"agent": {"drian": True}},
    {"webhook": {"enabled": "true"}},
    {"webhook": {"timeoutSeconds": 60}},
    {"webhook": {"certManager": {"enabled": "no"}}},
    {"webhook": {"injectJobs": "yes"}},
    {"image": {"pullPolicy": "Sometimes"}},
    {"metrics": {"serviceMonitor": {"enabled": "yes"}}},
    {"dashboard": {"enabled": None}},
]


def check_values_schema(helm):
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(values)]
    check(not errors, f"values.yaml does not validate against values.schema.json: {errors}")
    chart = helm.Chart.load(str(CHART))
    for wrong in WRONG_VALUES:
        merged = merge(values, wrong)
        check(not validator.is_valid(merged), f"values.schema.json accepts {wrong}")
        try:
            chart.validate_schema(wrong)
            check(False, f"helm's schema validation accepts {wrong}")
        except helm.HelmError:
            pass
    print(f"ok: values.yaml validates; {len(WRONG_VALUES)} wrong-typed values files are rejected")


# ---------------------------------------------------------------- RBAC against DESIGN.md
def design_rbac():
    """(base, drain_only): sets of (apiGroup, resource, verb) from DESIGN.md's `RBAC:` sentence.

    Every resource it names (nodes, pods, pods/eviction, events) is in the core group ("").
    """
    design = ROOT / "docs" / "DESIGN.md"
    if not design.exists():
        design = ROOT.parent / "shared" / "DESIGN.md"
    text = " ".join(design.read_text().split())
    match = re.search(r"RBAC: (.*?)\. Nothing else", text)
    if not check(match, f"{design} has no `RBAC: ... Nothing else` sentence"):
        return set(), set()
    base, drain = set(), set()
    for item in match.group(1).split(", "):
        only_drain = "only with `--drain`" in item
        item = re.sub(r"\s*\(.*\)", "", item).strip()
        verbs, resource = item.split(" ", 1)
        for verb in verbs.split("/"):
            (drain if only_drain else base).add(("", resource.strip(), verb))
    return base, drain


def chart_rbac(objects):
    rules = set()
    for obj in objects:
        if obj.get("kind") not in ("ClusterRole", "Role"):
            continue
        for rule in obj.get("rules", []):
            for group in rule.get("apiGroups", []):
                for resource in rule.get("resources", []):
                    for verb in rule.get("verbs", []):
                        rules.add((group, resource, verb))
            check("secrets" not in rule.get("resources", []), "a chart role grants secrets")
            check("*" not in rule.get("resources", []) + rule.get("verbs", []),
                  "a chart role uses a wildcard")
    return rules


# ---------------------------------------------------------------- rendering
RENDERINGS = {
    "defaults": {},
    "drain": {"agent": {"drain": True}},
    "passive": {"agent": {"passive": True}},
    "everything": {
        "agent": {"drain": True, "nodeSelector": {"eks.amazonaws.com/capacityType": "SPOT"}},
        "webhook": {"enabled": True},
        "metrics": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}},
        "dashboard": {"enabled": True},
    },
    "cert-manager": {"webhook": {"enabled": True, "certManager": {"enabled": True}}},
    "pods-only-webhook": {"webhook": {"enabled": True, "injectJobs": False}},
}

REQUIRED_LABELS = ["app.kubernetes.io/name", "app.kubernetes.io/instance",
                   "app.kubernetes.io/version", "app.kubernetes.io/managed-by",
                   "app.kubernetes.io/part-of"]


def quantity(value):
    """Kubernetes quantity → float (bytes for memory, cores for CPU)."""
    units = {"m": 1e-3, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "k": 1e3, "M": 1e6, "G": 1e9}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    return float(match.group(1)) * units.get(match.group(2), 1)


def check_hardened(container, where):
    ctx = container.get("securityContext", {})
    check(ctx.get("runAsNonRoot") is True, f"{where}: runAsNonRoot is not true")
    check(ctx.get("readOnlyRootFilesystem") is True, f"{where}: root filesystem is writable")
    check(ctx.get("allowPrivilegeEscalation") is False, f"{where}: privilege escalation allowed")
    check(ctx.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: capabilities not dropped")
    check(not ctx.get("capabilities", {}).get("add"), f"{where}: capabilities added")
    check(ctx.get("seccompProfile", {}).get("type") == "RuntimeDefault",
          f"{where}: seccomp is not RuntimeDefault")


def check_agent(daemonset, name):
    spec = daemonset["spec"]["template"]["spec"]
    where = f"{name}: agent DaemonSet"
    check(spec.get("hostNetwork") is True, f"{where}: not on the host network")
    check(spec.get("dnsPolicy") == "ClusterFirstWithHostNet", f"{where}: dnsPolicy")
    check(spec.get("priorityClassName") == "system-node-critical", f"{where}: priority class")
    check({"operator": "Exists"} in spec.get("tolerations", []),
          f"{where}: does not tolerate every taint")
    check(daemonset["spec"].get("updateStrategy", {}).get("type") == "RollingUpdate",
          f"{where}: not a rolling update")
    (agent,) = spec["containers"]
    env = {e["name"]: e for e in agent.get("env", [])}
    check(env.get("NODE_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
          == "spec.nodeName", f"{where}: NODE_NAME does not come from spec.nodeName")
    check(agent.get("livenessProbe", {}).get("httpGet", {}).get("path") == "/healthz",
          f"{where}: liveness probe is not /healthz")
    check(agent.get("readinessProbe", {}).get("httpGet", {}).get("path") == "/readyz",
          f"{where}: readiness probe is not /readyz")
    limits = agent.get("resources", {}).get("limits", {})
    check("memory" in limits and quantity(limits["memory"]) <= 50 * 1024**2,
          f"{where}: memory limit {limits.get('memory')} is above DESIGN.md's 50Mi")
    check("cpu" in limits and quantity(limits["cpu"]) <= 0.1,
          f"{where}: CPU limit {limits.get('cpu')} is above DESIGN.md's 100m")
    check_hardened(agent, where)
    return env


def check_webhook(objects, name, values):
    configs = [o for o in objects if o["kind"] == "MutatingWebhookConfiguration"]
    if not check(len(configs) == 1, f"{name}: expected one MutatingWebhookConfiguration"):
        return {}
    hooks = {h["name"]: h for h in configs[0]["webhooks"]}
    inject_jobs = values.get("webhook", {}).get("injectJobs", True)
    expected = {"inject.nerve.io"} | ({"inject-jobs.nerve.io"} if inject_jobs else set())
    check(set(hooks) == expected, f"{name}: webhooks {sorted(hooks)}, expected {sorted(expected)}")
    cert_manager = "cert-manager.io/inject-ca-from" in configs[0]["metadata"].get("annotations", {})
    for hook_name, hook in hooks.items():
        where = f"{name}: webhook {hook_name}"
        check(hook.get("failurePolicy") == "Ignore", f"{where}: failurePolicy is not Ignore")
        check(hook.get("sideEffects") == "None", f"{where}: sideEffects is not None")
        check(0 < hook.get("timeoutSeconds", 30) <= 10, f"{where}: timeout is not short")
        check(hook.get("admissionReviewVersions") == ["v1"], f"{where}: not AdmissionReview v1")
        check(cert_manager or hook["clientConfig"].get("caBundle"),
              f"{where}: neither a caBundle nor cert-manager CA injection")
        check(hook["clientConfig"].get("service", {}).get("path") == "/mutate",
              f"{where}: does not call /mutate")
        ops = {op for rule in hook.get("rules", []) for op in rule.get("operations", [])}
        check(ops == {"CREATE"}, f"{where}: operations {sorted(ops)}, expected only CREATE")
    pods = hooks.get("inject.nerve.io", {})
    check(pods.get("objectSelector") == {"matchLabels": {"nerve.io/checkpoint": "enabled"}},
          f"{name}: pod webhook objectSelector is not nerve.io/checkpoint=enabled")
    check([(r["apiGroups"], r["resources"]) for r in pods.get("rules", [])] == [([""], ["pods"])],
          f"{name}: pod webhook does not match exactly pods")
    if "inject-jobs.nerve.io" in hooks:
        jobs = hooks["inject-jobs.nerve.io"]
        check([(r["apiGroups"], r["apiVersions"], r["resources"]) for r in jobs.get("rules", [])]
              == [(["batch"], ["v1"], ["jobs"])], f"{name}: Job webhook does not match batch/v1 jobs")
        # Every Job in the cluster would reach the webhook without a condition on the opt-in
        # label (an objectSelector cannot see the pod template's labels).
        conditions = " ".join(c.get("expression", "") for c in jobs.get("matchConditions", []))
        check("object.spec.template.metadata.labels['nerve.io/checkpoint'] == 'enabled'"
              in " ".join(conditions.split()),
              f"{name}: Job webhook has no match condition on the template's opt-in label")
        check(jobs.get("namespaceSelector") == pods.get("namespaceSelector"),
              f"{name}: the Job and pod webhooks see different namespaces")
    deployment = next(o for o in objects
                      if o["kind"] == "Deployment"
                      and o["metadata"]["labels"].get("app.kubernetes.io/component") == "webhook")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    check_hardened(container, f"{name}: webhook Deployment")
    return {e["name"]: e for e in container.get("env", [])}


def render_chart(helm):
    chart = helm.Chart.load(str(CHART))
    base, drain = design_rbac()
    env_vars = {"agent": set(), "webhook": set()}
    for name, values in RENDERINGS.items():
        rendered = chart.render(values, name="nerve", namespace="nerve-system", is_install=True)
        objects = []
        for path, text in rendered.items():
            if path.endswith("NOTES.txt"):
                check(text.strip(), f"{name}: NOTES.txt is empty")
                continue
            try:
                objects += [o for o in yaml.safe_load_all(text) if o]
            except yaml.YAMLError as e:
                check(False, f"{name}: {path} renders to invalid YAML: {e}")
        for obj in objects:
            labels = obj.get("metadata", {}).get("labels", {})
            missing = [label for label in REQUIRED_LABELS if label not in labels]
            check(not missing, f"{name}: {obj['kind']}/{obj['metadata'].get('name')} lacks {missing}")
        expected = base | (drain if values.get("agent", {}).get("drain") else set())
        actual = chart_rbac(objects)
        check(actual == expected,
              f"{name}: chart RBAC {sorted(actual)} differs from DESIGN.md {sorted(expected)}")
        daemonsets = [o for o in objects if o["kind"] == "DaemonSet"]
        if check(len(daemonsets) == 1, f"{name}: expected one DaemonSet"):
            env_vars["agent"] |= set(check_agent(daemonsets[0], name))
        if values.get("webhook", {}).get("enabled"):
            env_vars["webhook"] |= set(check_webhook(objects, name, values))
        kinds = sorted({o["kind"] for o in objects})
        print(f"ok: rendered '{name}': {len(objects)} objects ({', '.join(kinds)})")
    report = helm.lint(str(CHART), strict=True, namespace="nerve-system")
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report.get("errors", [])
    check(not problems, f"helm lint --strict: {problems}")
    print(f"ok: RBAC equals DESIGN.md ({sorted(base)}, drain adds {sorted(drain)}); lint clean")
    (ROOT / "target").mkdir(exist_ok=True)
    (ROOT / "target" / "chart-env.json").write_text(
        json.dumps({k: sorted(v) for k, v in env_vars.items()}))


# ---------------------------------------------------------------- env vars against --help
def check_help(agent, sidecar):
    """Every NERVE_* variable the chart and the units set is one the binaries read."""
    env = json.loads((ROOT / "target" / "chart-env.json").read_text())

    def help_text(*argv):
        return subprocess.run(list(argv), check=True, capture_output=True, text=True).stdout

    agent_help = help_text(agent, "--help")
    sidecar_help = {cmd: help_text(sidecar, cmd, "--help")
                    for cmd in ("run", "restore", "webhook", "inject")}
    for var in env["agent"]:
        if var.startswith("NERVE_"):
            check(f"env: {var}" in agent_help, f"the chart sets {var} but nerve-agent does not read it")
    for var in env["webhook"]:
        if var.startswith("NERVE_"):
            check(f"env: {var}" in sidecar_help["webhook"],
                  f"the chart sets {var} but `nerve-sidecar webhook` does not read it")
    units = {
        "nerve-agent.service": [agent_help],
        "nerve-sidecar@.service": [sidecar_help["run"], sidecar_help["restore"]],
    }
    for unit, helps in units.items():
        text = (ROOT / "systemd" / unit).read_text()
        for var in re.findall(r"^Environment=(NERVE_[A-Z_]+)=", text, re.M):
            check(any(f"env: {var}" in h for h in helps),
                  f"systemd/{unit} sets {var} but the binary does not read it")
    print("ok: every NERVE_* variable the chart and the units set appears in the binaries' --help")


# ---------------------------------------------------------------- static binaries
def check_static(paths):
    for path in paths:
        data = pathlib.Path(path).read_bytes()
        check(data[:4] == b"\x7fELF" and data[4] == 2, f"{path} is not a 64-bit ELF file")
        phoff = int.from_bytes(data[0x20:0x28], "little")
        phentsize = int.from_bytes(data[0x36:0x38], "little")
        phnum = int.from_bytes(data[0x38:0x3A], "little")
        types = [int.from_bytes(data[phoff + i * phentsize:phoff + i * phentsize + 4], "little")
                 for i in range(phnum)]
        pt_interp = 3
        check(pt_interp not in types, f"{path} asks for a dynamic loader (not static)")
    print(f"ok: {len(paths)} binaries are static (no ELF interpreter)")


def main():
    command = sys.argv[1]
    if command == "chart":
        import helm_python as helm

        check_files_parse()
        check_values_schema(helm)
        render_chart(helm)
    elif command == "help":
        check_help(sys.argv[2], sys.argv[3])
    elif command == "static":
        check_static(sys.argv[2:])
    else:
        raise SystemExit(f"unknown command {command}")
    if FAILURES:
        print(f"{len(FAILURES)} deployment check(s) failed")
    return min(len(FAILURES), 100)


if __name__ == "__main__":
    sys.exit(main())
