#!/usr/bin/env python3
"""Validates deploy/: the Kubernetes manifests against the API's schemas (kubernetes-validate,
strict) and the prometheus-operator objects structurally; the PrometheusRule's groups with
promtool; the dashboards' ConfigMaps against grafana/dashboards; that the pieces agree with each
other (ports, labels, token paths, profile paths); the Parca and Alloy configurations; and that
the demo starts with the Deployment's arguments and serves its profile, with its token, on the
path the annotations name.

    python3 deploy/validate.py DEMO_BINARY

Run by scripts/test.sh in a virtualenv holding kubernetes-validate (PyPI)."""
import json
import pathlib
import re
import subprocess
import sys
import tempfile
import urllib.request

import kubernetes_validate
import yaml

DEPLOY = pathlib.Path(__file__).parent
ROOT = DEPLOY.parent
K8S = DEPLOY / "kubernetes"
GO_ONLY_PROFILES = ("process_cpu", "goroutine", "mutex", "block")
failures = []


def check(condition, message):
    if not condition:
        failures.append(message)
    return condition


def manifests():
    """Every object of every manifest kustomization.yaml lists, with its file."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = kustomization["resources"]
    on_disk = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    check(sorted(listed) == on_disk, f"kustomization.yaml lists {listed}, the directory has {on_disk}")
    labels = [pair for entry in kustomization.get("labels", []) for pair in entry.get("pairs", {})]
    check("release" in labels, "kustomization.yaml sets no release label for prometheus-operator")
    for name in listed:
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            yield name, doc


def validate_builtin(name, doc):
    try:
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return False
    except kubernetes_validate.ValidationError as e:
        check(False, f"{name}: {doc['kind']} {doc['metadata']['name']}: {e.message} at {list(e.path)}")
    return True


def validate_crds(objects):
    deployment = next(d for _, d in objects if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]
    ports = {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
    for name, doc in objects:
        kind = doc["kind"]
        if kind == "PodMonitor":
            check(doc["apiVersion"] == "monitoring.coreos.com/v1", f"{name}: apiVersion")
            selector = doc["spec"]["selector"]["matchLabels"]
            check(selector.items() <= pod["metadata"]["labels"].items(),
                  f"{name}: selector {selector} matches no demo pod")
            for endpoint in doc["spec"]["podMetricsEndpoints"]:
                check(endpoint["port"] in ports, f"{name}: port {endpoint['port']} is not one of {ports}")
                check(endpoint.get("path") == "/metrics", f"{name}: path")
        elif kind == "PrometheusRule":
            check(doc["apiVersion"] == "monitoring.coreos.com/v1", f"{name}: apiVersion")
            shipped = yaml.safe_load((ROOT / "alerts" / "memory.rules.yml").read_text())
            check(doc["spec"] == shipped, f"{name}: groups differ from alerts/memory.rules.yml")
            with tempfile.NamedTemporaryFile("w", suffix=".yml") as rules:
                yaml.safe_dump(doc["spec"], rules)
                rules.flush()
                result = subprocess.run(["promtool", "check", "rules", rules.name],
                                        capture_output=True, text=True)
                check(result.returncode == 0, f"{name}: promtool check rules: {result.stdout}{result.stderr}")
        elif kind == "ConfigMap" and doc["metadata"].get("labels", {}).get("grafana_dashboard") == "1":
            for file, text in doc["data"].items():
                committed = json.loads((ROOT / "grafana" / "dashboards" / file).read_text())
                check(json.loads(text) == committed, f"{name}: {file} differs from grafana/dashboards/{file}")
    return pod


def validate_parca(token_path):
    config = yaml.safe_load((DEPLOY / "parca" / "parca.yaml").read_text())
    known = {"job_name", "scrape_interval", "scrape_timeout", "scheme", "params", "static_configs",
             "kubernetes_sd_configs", "relabel_configs", "profiling_config", "bearer_token_file",
             "authorization", "tls_config", "basic_auth"}
    check(set(config) <= {"object_storage", "scrape_configs", "debug_info"}, "parca.yaml: unknown top-level keys")
    for job in config["scrape_configs"]:
        check(set(job) <= known, f"parca.yaml: unknown keys {set(job) - known}")
        check(job.get("bearer_token_file") == token_path, "parca.yaml: bearer_token_file is not the mounted token")
        pprof = job["profiling_config"]["pprof_config"]
        check(pprof["memory"] == {"enabled": True, "path": "/debug/pprof/allocs"},
              f"parca.yaml: memory profile {pprof['memory']}")
        for profile in GO_ONLY_PROFILES:
            check(pprof.get(profile) == {"enabled": False}, f"parca.yaml: {profile} must be disabled")


def validate_alloy(pod, token_path):
    text = (DEPLOY / "alloy" / "config.alloy").read_text()
    code = re.sub(r"//.*", "", text)
    check(code.count("{") == code.count("}"), "config.alloy: unbalanced braces")
    check(re.search(r'bearer_token_file\s*=\s*"' + re.escape(token_path) + '"', code),
          "config.alloy: bearer_token_file is not the mounted token")
    memory = re.search(r"profile\.memory\s*\{([^}]*)\}", code)
    check(memory and 'path    = "/debug/pprof/allocs"' in memory.group(1) and "enabled = true" in memory.group(1),
          "config.alloy: profile.memory must be enabled on /debug/pprof/allocs")
    for profile in GO_ONLY_PROFILES + ("fgprof", "godeltaprof_memory"):
        block = re.search(r"profile\." + profile + r"\s*\{([^}]*)\}", code)
        check(block and "enabled = false" in block.group(1), f"config.alloy: {profile} must be disabled")
    check("pyroscope.write" in code and "forward_to = [pyroscope.write" in code.replace("      ", " "),
          "config.alloy: profiles are not forwarded to pyroscope.write")
    # The annotations the relabel rules read are the ones the pod carries.
    annotations = pod["metadata"]["annotations"]
    for key in annotations:
        meta = "__meta_kubernetes_pod_annotation_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)
        check(meta in code, f"config.alloy does not read the pod annotation {key}")
    ports = {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
    check(annotations["profiles.grafana.com/memory.port_name"] in ports, "memory.port_name names no container port")


def arg_after(args, flag):
    return args[args.index(flag) + 1] if flag in args[:-1] else None


def run_demo(binary, pod):
    """The demo with the Deployment's arguments (local address and token file swapped in)
    serves the annotated profile path with the token, and refuses it without."""
    container = pod["spec"]["containers"][0]
    args = list(container["args"])
    with tempfile.TemporaryDirectory() as tmp:
        token = pathlib.Path(tmp) / "token"
        token.write_text("a-token-from-the-secret\n")
        if not check("0.0.0.0:9464" in args and arg_after(args, "--debug-token-file"),
                     f"the Deployment's arguments {args} lack --listen 0.0.0.0:9464 or --debug-token-file"):
            return
        args[args.index("0.0.0.0:9464")] = "127.0.0.1:0"
        args[args.index("--debug-token-file") + 1] = str(token)
        demo = subprocess.Popen([binary, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            address = None
            for line in demo.stdout:
                match = re.match(r"\s*http://([0-9.:]+)/metrics", line)
                if match:
                    address = match.group(1)
                    break
            if not check(address, f"the demo did not start with the Deployment's arguments {container['args']}"):
                return
            path = pod["metadata"]["annotations"]["profiles.grafana.com/memory.path"]
            request = urllib.request.Request(f"http://{address}{path}",
                                             headers={"Authorization": "Bearer a-token-from-the-secret"})
            with urllib.request.urlopen(request, timeout=30) as response:
                check(response.status == 200 and response.headers["Content-Type"] == "application/octet-stream",
                      f"{path}: {response.status} {response.headers['Content-Type']}")
            try:
                urllib.request.urlopen(f"http://{address}{path}", timeout=30)
                check(False, f"{path} answered without the token")
            except urllib.error.HTTPError as e:
                check(e.code == 401, f"{path} without the token: {e.code}")
        finally:
            demo.kill()
            demo.wait()


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    objects = list(manifests())
    crds = [(n, d) for n, d in objects if not validate_builtin(n, d)]
    check({d["kind"] for _, d in crds} == {"PodMonitor", "PrometheusRule"},
          f"objects without a built-in schema: {[d['kind'] for _, d in crds]}")
    pod = validate_crds(objects)
    mount = next(m for c in pod["spec"]["containers"] for m in c["volumeMounts"] if m["name"] == "debug-token")
    token_path = mount["mountPath"]
    args = pod["spec"]["containers"][0]["args"]
    check(arg_after(args, "--debug-token-file") == token_path, "the demo reads another token file than is mounted")
    validate_parca(token_path)
    validate_alloy(pod, token_path)
    run_demo(sys.argv[1], pod)
    for failure in failures:
        print("FAILED:", failure)
    if failures:
        sys.exit(1)
    print(f"deploy/ is valid: {len(objects)} Kubernetes objects, parca.yaml, config.alloy, the demo with the Deployment's arguments")


if __name__ == "__main__":
    main()
