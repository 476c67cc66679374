"""Kubernetes manifests, the compose scale form and .dockerignore agree with the settings and the Dockerfile.

All offline: the manifests are validated against the JSON schemas bundled in kubernetes-validate
(strict, so a misspelt field fails), and each check is shown to fail on a broken copy.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Callable

import kubernetes_validate
import pytest
import yaml

from service.config import Settings

ROOT = Path(__file__).resolve().parent.parent
K8S_DIR = ROOT / "deploy" / "k8s"
ENV_NAMES = {f"NUCLEI_{name.upper()}" for name in Settings.model_fields}
NAME_LABEL = "app.kubernetes.io/name"
APP = "nuclei-seg"
# The oldest Kubernetes minor still commonly run, and the newest the installed package bundles.
K8S_VERSIONS = ("1.30", kubernetes_validate.latest_version())
PEAK_RSS_BYTES = 1.3e9  # measured peak of one 16-MP image
GIB = 1024**3

Manifests = dict[str, dict[str, Any]]  # by kind


# --- Kubernetes -------------------------------------------------------------------------------------


def load_manifests() -> Manifests:
    """Every API object under deploy/k8s (kustomization.yaml is kustomize's, not the API server's)."""
    objects: Manifests = {}
    for path in sorted(K8S_DIR.glob("*.y*ml")):
        if path.name.startswith("kustomization."):
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            assert doc["kind"] not in objects, f"two {doc['kind']} objects"
            objects[doc["kind"]] = doc
    return objects


def pod_spec(m: Manifests) -> dict[str, Any]:
    return m["Deployment"]["spec"]["template"]["spec"]


def container(m: Manifests) -> dict[str, Any]:
    (main,) = [c for c in pod_spec(m)["containers"] if c["name"] == APP]
    return main


def env_of(m: Manifests) -> dict[str, dict[str, Any]]:
    entries = container(m)["env"]
    names = [entry["name"] for entry in entries]
    assert len(names) == len(set(names)), f"duplicate env names: {names}"
    return {entry["name"]: entry for entry in entries}


def env_value(m: Manifests, name: str) -> str:
    return env_of(m)[name]["value"]


def cpu_cores(quantity: str | int | float) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def memory_bytes(quantity: str | int) -> float:
    units = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(quantity))
    assert match, quantity
    number, unit = match.groups()
    return float(number) * (units[unit] if unit else 1)


def dockerfile_user() -> int:
    return int(re.search(r"^USER (\S+)$", (ROOT / "Dockerfile").read_text(), re.M).group(1))


def selects_pods(selector: dict[str, Any], pod_labels: dict[str, str]) -> bool:
    """A label selector (matchLabels only; matchExpressions is not used here) that picks these pods."""
    assert "matchExpressions" not in selector
    labels = selector["matchLabels"]
    return bool(labels) and all(pod_labels.get(k) == v for k, v in labels.items())


def check_selectors(m: Manifests) -> None:
    dep = m["Deployment"]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert pod_labels[NAME_LABEL] == APP
    for kind, obj in m.items():
        assert obj["metadata"]["labels"][NAME_LABEL] == APP, kind
    assert selects_pods(dep["spec"]["selector"], pod_labels), "Deployment selector"
    service_selector = m["Service"]["spec"]["selector"]
    assert service_selector and all(pod_labels.get(k) == v for k, v in service_selector.items()), "Service selector"
    assert selects_pods(m["PodDisruptionBudget"]["spec"]["selector"], pod_labels), "PDB selector"


def check_ports_and_probes(m: Manifests) -> None:
    main = container(m)
    (http,) = [p for p in main["ports"] if p.get("name") == "http"]
    port = http["containerPort"]
    assert port == int(env_value(m, "NUCLEI_PORT")) and env_value(m, "NUCLEI_HOST") == "0.0.0.0"
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz"), ("startupProbe", "/readyz")):
        get = main[probe]["httpGet"]
        assert get["path"] == path, probe
        assert get["port"] in ("http", port), probe
    (service_port,) = m["Service"]["spec"]["ports"]
    assert service_port["targetPort"] in ("http", port), "Service targetPort"


def check_resources(m: Manifests) -> None:
    resources = container(m)["resources"]
    requests, limits = resources["requests"], resources["limits"]
    cpu = cpu_cores(limits["cpu"])
    assert cpu_cores(requests["cpu"]) == cpu, "CPU request != limit"
    assert cpu == int(cpu) and int(env_value(m, "NUCLEI_THREADS")) == int(cpu), "NUCLEI_THREADS != CPU limit"
    assert env_value(m, "NUCLEI_WORKERS") == "1"
    memory_request, memory_limit = memory_bytes(requests["memory"]), memory_bytes(limits["memory"])
    assert GIB <= memory_request <= memory_limit
    assert memory_limit > PEAK_RSS_BYTES * 1.25, "no headroom over one large image"


def check_env(m: Manifests) -> None:
    env = env_of(m)
    assert set(n for n in env if n.startswith("NUCLEI_")) <= ENV_NAMES, set(env) - ENV_NAMES
    for name, entry in env.items():
        if "value" in entry:  # every literal is valid for its setting
            Settings(**{name.removeprefix("NUCLEI_").lower(): entry["value"]})
    key_ref = env["NUCLEI_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert key_ref.get("optional") is True, "pods would not start without the Secret"
    assert key_ref["name"] and key_ref["key"]


def check_security(m: Manifests) -> None:
    spec, main = pod_spec(m), container(m)
    pod_sc, sc = spec.get("securityContext", {}), main["securityContext"]

    def effective(key: str) -> Any:
        return sc.get(key, pod_sc.get(key))

    assert effective("runAsNonRoot") is True
    assert effective("runAsUser") == dockerfile_user() != 0
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert "ALL" in sc["capabilities"]["drop"] and not sc["capabilities"].get("add")
    assert effective("seccompProfile") == {"type": "RuntimeDefault"}
    assert sc.get("privileged") is not True
    volumes = {v["name"]: v for v in spec["volumes"]}
    tmp = [volumes.get(v["name"], {}) for v in main.get("volumeMounts", []) if v["mountPath"] == "/tmp"]
    assert tmp and "emptyDir" in tmp[0], "/tmp is not an emptyDir (uploads spool there)"
    assert spec["automountServiceAccountToken"] is False
    assert spec["enableServiceLinks"] is False, "service links inject NUCLEI_* look-alike variables"


def check_drain(m: Manifests) -> None:
    spec = pod_spec(m)
    timeout = float(env_of(m).get("NUCLEI_REQUEST_TIMEOUT_S", {}).get("value", Settings().request_timeout_s))
    pre_stop = container(m).get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    sleep = float(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0.0
    assert spec["terminationGracePeriodSeconds"] > timeout + sleep, "pods are killed before in-flight requests end"


def check_targets(m: Manifests) -> None:
    dep, hpa, pdb = m["Deployment"], m["HorizontalPodAutoscaler"], m["PodDisruptionBudget"]
    assert hpa["apiVersion"] == "autoscaling/v2" and pdb["apiVersion"] == "policy/v1"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", dep["metadata"]["name"])
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization" and 0 < metric["resource"]["target"]["averageUtilization"] <= 100
    assert "replicas" not in dep["spec"], "a fixed replica count fights the HPA"
    min_replicas = hpa["spec"]["minReplicas"]
    assert 2 <= min_replicas <= hpa["spec"]["maxReplicas"]
    assert int(pdb["spec"]["minAvailable"]) < min_replicas, "the PDB would block every eviction"
    assert selects_pods(pdb["spec"]["selector"], dep["spec"]["template"]["metadata"]["labels"])


K8S_CHECKS: list[Callable[[Manifests], None]] = [
    check_selectors, check_ports_and_probes, check_resources, check_env, check_security, check_drain, check_targets]


def _set_env(m: Manifests, name: str, value: str) -> None:
    env_of(m)[name]["value"] = value


K8S_BREAKAGES: dict[str, tuple[Callable[[Manifests], None], Callable[[Manifests], None]]] = {
    "service selector": (lambda m: m["Service"]["spec"]["selector"].update({NAME_LABEL: "other"}), check_selectors),
    "pdb selector": (lambda m: m["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].update({NAME_LABEL: "x"}),
                     check_selectors),
    "deployment selector": (lambda m: m["Deployment"]["spec"]["selector"]["matchLabels"].update({"tier": "x"}),
                            check_selectors),
    "readiness on /healthz": (lambda m: container(m)["readinessProbe"]["httpGet"].update(path="/healthz"),
                              check_ports_and_probes),
    "liveness on /readyz": (lambda m: container(m)["livenessProbe"]["httpGet"].update(path="/readyz"),
                            check_ports_and_probes),
    "probe on another port": (lambda m: container(m)["livenessProbe"]["httpGet"].update(port=8080),
                              check_ports_and_probes),
    "NUCLEI_PORT != containerPort": (lambda m: _set_env(m, "NUCLEI_PORT", "9000"), check_ports_and_probes),
    "threads != cpu": (lambda m: _set_env(m, "NUCLEI_THREADS", "4"), check_resources),
    "cpu limit != threads": (lambda m: container(m)["resources"]["limits"].update(cpu="4"), check_resources),
    "memory limit below peak": (lambda m: container(m)["resources"]["limits"].update(memory="1Gi"), check_resources),
    "unknown setting": (lambda m: container(m)["env"].append({"name": "NUCLEI_THREAD", "value": "2"}), check_env),
    "invalid setting value": (lambda m: _set_env(m, "NUCLEI_WORKERS", "0"), check_env),
    "required api key": (lambda m: env_of(m)["NUCLEI_API_KEY"]["valueFrom"]["secretKeyRef"].pop("optional"),
                         check_env),
    "root user": (lambda m: container(m)["securityContext"].update(runAsUser=0), check_security),
    "writable root": (lambda m: container(m)["securityContext"].update(readOnlyRootFilesystem=False), check_security),
    "privilege escalation": (lambda m: container(m)["securityContext"].update(allowPrivilegeEscalation=True),
                             check_security),
    "non-root unset": (lambda m: [pod_spec(m)["securityContext"].pop("runAsNonRoot"),
                                  container(m)["securityContext"].pop("runAsNonRoot")], check_security),
    "no /tmp volume": (lambda m: container(m).pop("volumeMounts"), check_security),
    "short grace period": (lambda m: pod_spec(m).update(terminationGracePeriodSeconds=30), check_drain),
    "hpa targets another deployment": (
        lambda m: m["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"].update(name="other"), check_targets),
    "hpa on memory": (lambda m: m["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["resource"].update(name="memory"),
                      check_targets),
    "fixed replicas": (lambda m: m["Deployment"]["spec"].update(replicas=3), check_targets),
    "pdb blocks drains": (lambda m: m["PodDisruptionBudget"]["spec"].update(minAvailable=2), check_targets),
}


@pytest.fixture(scope="module")
def manifests() -> Manifests:
    return load_manifests()


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    files = {p.name for p in K8S_DIR.glob("*.y*ml") if not p.name.startswith("kustomization.")}
    assert sorted(kustomization["resources"]) == sorted(files)
    assert {"deployment.yaml", "service.yaml", "hpa.yaml", "pdb.yaml"} <= files


def test_manifests_are_the_expected_kinds(manifests: Manifests):
    assert set(manifests) == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate_against_the_kubernetes_schema(manifests: Manifests, version: str):
    for kind, obj in manifests.items():
        kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("breakage", ["misspelt field", "wrong type"])
def test_schema_validation_catches_a_broken_manifest(manifests: Manifests, breakage: str):
    broken = copy.deepcopy(manifests)
    if breakage == "misspelt field":
        container(broken)["readinesProbe"] = container(broken).pop("readinessProbe")
    else:
        container(broken)["ports"][0]["containerPort"] = "8000"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken["Deployment"], K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("check", K8S_CHECKS, ids=lambda c: c.__name__)
def test_manifests_pass(manifests: Manifests, check: Callable[[Manifests], None]):
    check(manifests)


@pytest.mark.parametrize("name", list(K8S_BREAKAGES))
def test_a_broken_manifest_fails_its_check(manifests: Manifests, name: str):
    breakage, check = K8S_BREAKAGES[name]
    broken = copy.deepcopy(manifests)
    breakage(broken)
    with pytest.raises((AssertionError, KeyError, ValueError)):
        check(broken)


# --- Compose scale form and nginx ---------------------------------------------------------------


class Reset:
    """Compose's `!reset` (drop the inherited value) and `!override` (replace instead of merge)."""

    def __init__(self, value: Any) -> None:
        self.value = value


class ComposeLoader(yaml.SafeLoader):
    pass


def _construct_reset(loader: yaml.SafeLoader, node: yaml.Node) -> Reset:
    if isinstance(node, yaml.SequenceNode):
        return Reset(loader.construct_sequence(node, deep=True))
    if isinstance(node, yaml.MappingNode):
        return Reset(loader.construct_mapping(node, deep=True))
    return Reset(loader.construct_scalar(node) or None)


ComposeLoader.add_constructor("!reset", _construct_reset)
ComposeLoader.add_constructor("!override", _construct_reset)


def load_compose(path: Path) -> dict[str, Any]:
    return yaml.load(path.read_text(), Loader=ComposeLoader)  # noqa: S506 (a SafeLoader subclass)


def merge(base: Any, override: Any) -> Any:
    """Compose's merge, as far as these files need: maps merge, sequences append, !reset replaces."""
    if isinstance(override, Reset):
        return override.value
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = merge(base[key], value) if key in base else (
                value.value if isinstance(value, Reset) else value)
        return merged
    if isinstance(base, list) and isinstance(override, list):
        return base + [item for item in override if item not in base]
    return override


def published_ports(service: dict[str, Any]) -> list[tuple[str, int]]:
    """(host port, container port) of each port the service publishes on a fixed host port."""
    fixed = []
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            if entry.get("published"):
                fixed.append((str(entry["published"]), int(entry["target"])))
            continue
        parts = str(entry).split("/")[0].split(":")
        if len(parts) > 1 and parts[-2]:  # HOST:CONTAINER or IP:HOST:CONTAINER
            fixed.append((parts[-2], int(parts[-1])))
    return fixed


def nginx_directives(text: str) -> list[tuple[str, list[str]]]:
    """(name, arguments) of every simple directive, comments stripped (blocks flattened)."""
    code = re.sub(r"#[^\n]*", "", text)
    return [(parts[0], parts[1:]) for statement in re.split(r"[;{}]", code) if (parts := statement.split())]


def nginx_args(directives: list[tuple[str, list[str]]], name: str) -> list[list[str]]:
    return [args for directive, args in directives if directive == name]


def nginx_bytes(size: str) -> float:
    match = re.fullmatch(r"(\d+)([kKmMgG]?)", size)
    assert match, size
    number, unit = match.groups()
    return int(number) * 1024 ** " kmg".index(unit.lower() or " ")


def nginx_seconds(time: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "": 1}
    total = 0.0
    for number, unit in re.findall(r"(\d+)(ms|s|m|h|)", time):
        total += int(number) * units[unit]
    return total


def check_compose(base: dict[str, Any], override: dict[str, Any], nginx_conf: str) -> None:
    merged = merge(base, override)
    app, lb = merged["services"][APP], merged["services"]["lb"]
    env = app["environment"]

    assert published_ports(base["services"][APP]), "docker-compose.yml itself should keep its host port"
    assert not published_ports(app), "replicas cannot share a fixed host port"
    assert "container_name" not in app, "a fixed container name prevents --scale"
    assert app.get("healthcheck"), "lb waits for service_healthy"
    assert lb["depends_on"][APP]["condition"] == "service_healthy"
    lb_ports = published_ports(lb)
    assert len(lb_ports) == 1, "lb publishes no fixed host port"
    ((_, lb_port),) = lb_ports

    # Paths in every -f file resolve against the first file's folder (the repository root).
    (mount,) = [v for v in lb["volumes"] if str(v).split(":")[1:2] == ["/etc/nginx/nginx.conf"]]
    source, _, mode = mount.split(":")
    assert (ROOT / source).resolve() == ROOT / "deploy" / "nginx.conf" and mode == "ro", mount

    directives = nginx_directives(nginx_conf)
    assert [str(lb_port)] in [args[:1] for args in nginx_args(directives, "listen")], "lb publishes another port"
    assert any(args[0] == "127.0.0.11" for args in nginx_args(directives, "resolver")), "no Docker DNS resolver"
    variables = {args[0]: args[1] for args in nginx_args(directives, "set")}
    (proxy_pass,) = nginx_args(directives, "proxy_pass")
    upstream = re.fullmatch(r"http://(\$\w+)", proxy_pass[0])
    assert upstream, "proxy_pass without a variable resolves the replicas once, at start"
    assert variables[upstream.group(1)] == f"{APP}:{int(env['NUCLEI_PORT'])}"

    (body,) = nginx_args(directives, "client_max_body_size")
    limit = nginx_bytes(body[0]) or float("inf")  # 0: no limit
    max_upload = int(env["NUCLEI_MAX_UPLOAD_BYTES"])
    assert limit >= max_upload * int(env.get("NUCLEI_MAX_BATCH_FILES", Settings().max_batch_files)), \
        "nginx refuses a /segment/batch the service accepts"
    timeout = float(env.get("NUCLEI_REQUEST_TIMEOUT_S", Settings().request_timeout_s))
    (read_timeout,) = nginx_args(directives, "proxy_read_timeout")
    assert nginx_seconds(read_timeout[0]) >= timeout
    assert ["on"] not in nginx_args(directives, "proxy_intercept_errors"), "503 + Retry-After must pass through"
    assert not any(a and a[0].lower() == "retry-after" for a in nginx_args(directives, "proxy_hide_header"))


@pytest.fixture(scope="module")
def compose_files() -> tuple[dict[str, Any], dict[str, Any], str]:
    return (load_compose(ROOT / "docker-compose.yml"), load_compose(ROOT / "deploy" / "compose.scale.yml"),
            (ROOT / "deploy" / "nginx.conf").read_text())


def test_compose_scale_form(compose_files):
    check_compose(*compose_files)


def _no_reset(base, override, conf):
    override["services"][APP].pop("ports")
    return base, override, conf


def _edit_lb(**changes):
    def breakage(base, override, conf):
        override["services"]["lb"].update(changes)
        return base, override, conf
    return breakage


def _edit_conf(old: str, new: str):
    def breakage(base, override, conf):
        assert old in conf
        return base, override, conf.replace(old, new)
    return breakage


COMPOSE_BREAKAGES = {
    "app keeps its host port": _no_reset,
    "lb publishes nothing": _edit_lb(ports=[]),
    "lb does not wait for health": _edit_lb(depends_on={APP: {"condition": "service_started"}}),
    "nginx.conf path relative to deploy/": _edit_lb(volumes=["./nginx.conf:/etc/nginx/nginx.conf:ro"]),
    "nginx.conf writable": _edit_lb(volumes=["./deploy/nginx.conf:/etc/nginx/nginx.conf:rw"]),
    "body limit of one file only": _edit_conf("client_max_body_size 3201m;", "client_max_body_size 50m;"),
    "short read timeout": _edit_conf("proxy_read_timeout 150s;", "proxy_read_timeout 60s;"),
    "wrong upstream port": _edit_conf("nuclei-seg:8000;", "nuclei-seg:9000;"),
    "static upstream": _edit_conf("proxy_pass http://$upstream;", "proxy_pass http://nuclei-seg:8000;"),
    "no docker resolver": _edit_conf("resolver 127.0.0.11", "resolver 8.8.8.8"),
    "errors intercepted": _edit_conf("proxy_intercept_errors off;", "proxy_intercept_errors on;"),
    "listens elsewhere": _edit_conf("listen 80;", "listen 8080;"),
}


@pytest.mark.parametrize("name", list(COMPOSE_BREAKAGES))
def test_a_broken_compose_scale_form_fails(compose_files, name: str):
    broken = COMPOSE_BREAKAGES[name](*copy.deepcopy(compose_files))
    with pytest.raises((AssertionError, KeyError, ValueError)):
        check_compose(*broken)


# --- .dockerignore ------------------------------------------------------------------------------


def _docker_pattern(pattern: str) -> re.Pattern[str]:
    """Docker's .dockerignore pattern (Go filepath.Match plus `**`), anchored at the context root."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i + 1)
            out, i = out + "[" + pattern[i + 1:end].replace("\\", "\\\\") + "]", end + 1
        elif pattern[i] == "\\":
            out, i = out + re.escape(pattern[i + 1]), i + 2
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignore_rules(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keep = line.startswith("!")
        pattern = line.removeprefix("!").strip().strip("/")
        rules.append((keep, _docker_pattern(re.sub(r"/+", "/", pattern))))
    return rules


def is_excluded(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern matching the path, or one of its parent folders, decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for keep, rule in rules:
        if any(rule.fullmatch(prefix) for prefix in prefixes):
            excluded = not keep
    return excluded


def dockerfile_copy_sources() -> list[str]:
    sources = []
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if match := re.match(r"^(?:COPY|ADD)\s+(.+)$", line.strip()):
            args = [a for a in match.group(1).split() if not a.startswith("--")]
            sources += [a.rstrip("/") for a in args[:-1]]
    return sources


def check_dockerignore(text: str) -> None:
    rules = dockerignore_rules(text)
    for path in (".git", ".git/HEAD", ".venv/bin/python", ".venv-ci/bin/python", "venv/bin/python",
                 "runs/train/log.txt", "service/__pycache__/app.cpython-311.pyc", "nuclei_seg.egg-info/PKG-INFO",
                 ".pytest_cache/README.md", "tests/test_k8s.py", "docs/performance.md", "benchmarks/harness.py"):
        assert is_excluded(path, rules), f"{path} is sent to the build"
    sources = dockerfile_copy_sources()
    assert {"constraints.txt", "pyproject.toml", "README.md", "service", "models/default"} <= set(sources), sources
    for source in sources:
        path = ROOT / source
        assert path.exists(), source
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()
                                               and "__pycache__" not in p.parts and p.suffix != ".pyc"]
        assert files, source
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            assert not is_excluded(relative, rules), f"the Dockerfile copies {relative}, .dockerignore drops it"


def test_dockerignore():
    check_dockerignore((ROOT / ".dockerignore").read_text())


@pytest.mark.parametrize("breakage", [
    lambda t: t + "\nservice\n",
    lambda t: t + "\n*.md\n",
    lambda t: t + "\n**/*.json\n",  # models/default/metadata.json
    lambda t: t.replace("!models/default", ""),
    lambda t: t.replace(".venv*", ".venv"),  # .venv-ci sent
    lambda t: t.replace("**/__pycache__", "__pycache__").replace("**/*.pyc", "*.pyc"),  # root-only in Docker
    lambda t: t.replace("\n.git\n", "\n"),
    lambda t: t.replace("\nruns\n", "\n"),
], ids=["service", "markdown", "json", "no model exception", "venv-ci", "root-only pyc", "git", "runs"])
def test_a_broken_dockerignore_fails(breakage):
    text = (ROOT / ".dockerignore").read_text()
    broken = breakage(text)
    assert broken != text
    with pytest.raises(AssertionError):
        check_dockerignore(broken)
