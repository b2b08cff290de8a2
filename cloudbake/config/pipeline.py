"""Load ``pipeline.yaml``: validate it against the schema, locate every problem, freeze it.

The schema (``schema/pipeline.schema.json``) is the single source of truth for
keys, types, enums and defaults; this module only adds what JSON Schema cannot
say: where in the YAML file a problem is, and what the user probably meant.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from cloudbake.config import distros
from cloudbake.config.model import (
    VM,
    Accel,
    Arch,
    CloudInit,
    Compression,
    Dependencies,
    Disk,
    Distro,
    Firmware,
    Forward,
    Pipeline,
    RemoteCache,
    SignaturePolicy,
    Source,
    TestSettings,
    Verify,
    parse_remote,
)
from cloudbake.config.plan import Locator, parent_problems, parse_dotted, plan_images, replace_position
from cloudbake.config.problems import fill_defaults, load_schema, schema_problems
from cloudbake.config.yamlfile import Problem, dotted, locate, parse_yaml, suggest
from cloudbake.core.errors import PipelineError
from cloudbake.core.units import parse_disk_size, parse_duration, parse_size


def _resolve(base: Path, value: str | None) -> Path | None:
    if value is None:
        return None
    try:
        return (base / os.path.expanduser(value)).resolve()
    except RuntimeError as err:  # Python < 3.13 raises RuntimeError for symlink loops
        raise OSError(str(err)) from None


def default_cache_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "cloudbake"


def _read_document(file: Path) -> tuple[dict[str, Any], yaml.Node | None]:
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PipelineError(f"{file}: pipeline file not found",
                            hint="create it (start from cloudbake's pipeline.yaml) or pass pipeline=PATH") from None
    except (OSError, UnicodeDecodeError) as err:
        raise PipelineError(f"{file}: cannot read pipeline file: {err}") from None
    document, root = parse_yaml(text, file, yaml12_booleans=True)
    if document is None:
        raise PipelineError(f"{file}:1:1: the pipeline is empty",
                            hint="start from the pipeline.yaml shipped with cloudbake; every key has a default")
    if not isinstance(document, dict):
        line, col = locate(root, [])
        raise PipelineError(f"{file}:{line}:{col}: the pipeline must be a mapping of keys (name:, source:, ...), "
                            f"not a {type(document).__name__}")
    return document, root


def _raise_problems(file: Path, problems: list[Problem]) -> None:
    if problems:
        rendered = list(dict.fromkeys(p.render(file) for p in problems))  # an override shared by images: once
        count = f"{len(rendered)} problem{'s' if len(rendered) > 1 else ''}"
        raise PipelineError(f"{file}: {count}:\n" + "\n".join(rendered),
                            hint="every key is described in docs/configuration.md")


def load_images(file: Path | str) -> tuple[Pipeline, ...]:
    """Read, validate and freeze every image a pipeline file describes, parents before children.

    A file without ``matrix:`` or ``images:`` describes one image. All problems are reported
    in one PipelineError, each with its file, line and column (an override's own line).
    """
    file = Path(file)
    document, root = _read_document(file)
    schema = load_schema()
    problems = schema_problems(document, root, schema)
    _raise_problems(file, problems)
    plans, problems = plan_images(document, root)
    base = file.resolve().parent
    docs: dict[str, dict[str, Any]] = {}
    for plan in plans:
        where = plan.locator(root)
        merged = plan.document
        found = [replace_position(p, where(parse_dotted(p.path))) for p in schema_problems(merged, None, schema)]
        docs[plan.name] = fill_defaults(merged, schema)
        if not found:
            found = _file_problems(docs[plan.name], where, base)
        if not found and plan.parent in docs:
            found = parent_problems(plan, docs[plan.name], docs[plan.parent], where)
        problems += [Problem(p.line, p.col, p.path, f"{p.message} (image {plan.name})" if len(plans) > 1
                             else p.message) for p in found]
    _raise_problems(file, problems)
    family = str(fill_defaults(document, schema)["name"])
    frozen: dict[str, Pipeline] = {}
    for plan in plans:
        parent = frozen[plan.parent] if plan.parent is not None else None
        if parent is not None:
            lock_file = parent.lock_file
        elif len(plans) == 1:
            lock_file = file.resolve().with_suffix(".lock")
        else:
            lock_file = file.resolve().with_name(f"{file.stem}.{plan.name}.lock")
        frozen[plan.name] = freeze(docs[plan.name], file, parent=parent, family=family, lock_file=lock_file)
    return tuple(frozen.values())


def load_pipeline(file: Path | str, image: str | None = None) -> Pipeline:
    """The one image of a pipeline file, or the one named ``image`` in a file that describes several."""
    return select_image(load_images(file), image, file)


def select_image(images: tuple[Pipeline, ...], image: str | None, file: Path | str) -> Pipeline:
    names = [pipeline.name for pipeline in images]
    if image is None:
        if len(images) == 1:
            return images[0]
        raise PipelineError(f"{file} describes {len(images)} images ({', '.join(names)}); name one",
                            hint="name it: cloudbake --image NAME; pytest --cloudbake-image NAME (or "
                                 "@pytest.mark.cloudbake_image(NAME)); cloudbake.vm(..., image=NAME); "
                                 f"doit bake:{names[0]}")
    for pipeline in images:
        if pipeline.name == image:
            return pipeline
    raise PipelineError(f"{file} has no image named {image!r}{suggest(image, names)}; its images: {', '.join(names)}")


# --- many images: matrix and images -----------------------------------------------------


# Matrix shorthands: the keys a matrix nearly always spans.

def _file_problems(document: dict[str, Any], where: Locator, base: Path) -> list[Problem]:
    """Files the pipeline names must exist when it loads, not halfway through a bake."""
    filled = fill_defaults(document, load_schema())
    checks: list[tuple[list[str | int], str | None]] = [
        (["cloud_init", "user_data"], filled["cloud_init"]["user_data"]),
        (["cloud_init", "network_config"], filled["cloud_init"]["network_config"]),
        (["cloud_init", "vendor_data"], filled["cloud_init"]["vendor_data"]),
        (["source", "verify", "keyring"], filled["source"]["verify"]["keyring"]),
    ]
    problems = []
    for path, value in checks:
        try:
            resolved = _resolve(base, value)
            missing = resolved is not None and not resolved.is_file()
            reason = f"file not found: {resolved} (paths are relative to the pipeline's folder)"
        except OSError as err:  # a symlink loop (see _resolve)
            missing, reason = True, f"cannot follow this path: {err}"
        if missing:
            line, col = where(path)
            problems.append(Problem(line, col, dotted(path), reason))
    problems += _test_problems(filled["test"], where)
    problems += _source_problems(filled["source"], where)
    return problems


def _source_problems(source: dict[str, Any], where: Locator) -> list[Problem]:
    """What the schema cannot say per distribution: its releases, its channels, how its sums are trusted."""
    distro = Distro(source["distro"])
    facts = distros.facts(distro)
    problems = []
    release, channel = str(source["release"]), str(source["channel"])
    if not distros.known_release(distro, release):
        line, col = where(["source", "release"])
        known = ", ".join(f"{codename} ({version})" if codename != version else version
                          for version, codename in facts.releases.items())
        names = [*facts.releases, *facts.releases.values()]
        problems.append(Problem(line, col, "source.release",
                                f"unknown {facts.label} release {release!r}{suggest(release, names)}; known: {known}"))
    if not distros.known_channel(distro, channel):
        line, col = where(["source", "channel"])
        problems.append(Problem(line, col, "source.channel",
                                f"{channel!r} is not a {facts.label} channel: use current or a build such as "
                                f"{facts.channel_example}"))
    signature = SignaturePolicy(source["verify"]["signature"])
    if not facts.signed and signature is not SignaturePolicy.none:
        line, col = where(["source", "verify", "signature"])
        problems.append(Problem(line, col, "source.verify.signature",
                                f"{facts.label} publishes no signature over its cloud images' checksums, so "
                                f"'{signature}' cannot be met: set source.verify.signature: none to trust the "
                                "checksums as served over TLS on the first fetch (the lock then pins the digest, and "
                                "only cloudbake update moves it)"))
    if facts.signed and signature is SignaturePolicy.none:
        line, col = where(["source", "verify", "signature"])
        problems.append(Problem(line, col, "source.verify.signature",
                                f"none is for distributions that sign nothing; {facts.label} signs its checksums: "
                                "use required (or off, to skip the check loudly)"))
    if facts.signed and signature is SignaturePolicy.required and not source["verify"]["fingerprints"] \
            and not distros.default_fingerprints(distro, release) and distros.known_release(distro, release):
        line, col = where(["source", "verify", "fingerprints"])
        problems.append(Problem(line, col, "source.verify.fingerprints",
                                f"cloudbake pins no signing key for {facts.label} {release}: name its key's "
                                "fingerprint here"))
    return problems


def _test_problems(test: dict[str, Any], where: Locator) -> list[Problem]:
    """What the schema cannot say about test.forward and test.upload."""
    problems = []
    guests: set[int] = set()
    hosts: set[int] = set()
    for index, item in enumerate(test["forward"]):
        forward = parse_forward(item)
        reason = None
        if max(forward.host, forward.guest) > 65535:
            reason = f"{item!r}: a TCP port is at most 65535"
        elif forward.guest == 22:
            reason = "guest port 22 is forwarded already (SSH); cloudbake prints and hands over its host port"
        elif forward.guest in guests:
            reason = f"guest port {forward.guest} is forwarded twice"
        elif forward.host and forward.host in hosts:
            reason = (f"host port {forward.host} is named twice; QEMU cannot listen on one port for two guest "
                      "ports (leave the host port out to get a free one)")
        guests.add(forward.guest)
        hosts.add(forward.host)
        if reason:
            line, col = where(["test", "forward", index])
            problems.append(Problem(line, col, dotted(["test", "forward", index]), reason))
    if isinstance(test["upload"], list):
        for index, pattern in enumerate(test["upload"]):
            if os.path.isabs(pattern) or ".." in Path(pattern).parts:
                line, col = where(["test", "upload", index])
                problems.append(Problem(line, col, dotted(["test", "upload", index]),
                                        f"{pattern!r} leaves the pipeline's folder; upload paths are relative to "
                                        "it and stay inside it"))
    return problems


def parse_forward(item: int | str) -> Forward:
    """``8080`` or ``"18080:8080"`` (host:guest), as the schema admits them."""
    host, _, guest = str(item).rpartition(":")
    return Forward(int(host) if host else 0, int(guest))


def freeze_remote(cache: dict[str, Any], base: Path) -> RemoteCache | None:
    if not cache["remote"]:
        return None
    registry, repository = parse_remote(cache["remote"])
    # CI turns pushing on for one branch without a second pipeline file.
    push = cache["push"] or os.environ.get("CLOUDBAKE_PUSH", "").strip().lower() in ("1", "true", "yes")
    return RemoteCache(registry=registry, repository=repository, push=push, tag_latest=cache["tag_latest"],
                       plain_http=cache["plain_http"], ca_file=_resolve(base, cache["ca_file"]))


def freeze(doc: dict[str, Any], file: Path, *, parent: Pipeline | None = None, family: str = "",
           lock_file: Path | None = None) -> Pipeline:
    """The frozen pipeline of one image's validated, defaults-filled document; paths resolved from ``file``."""
    base = file.resolve().parent
    cache_dir = _resolve(base, doc["cache"]["dir"]) or default_cache_dir()
    output_dir = _resolve(base, doc["output"]["dir"])
    build_dir = _resolve(base, doc["build"]["dir"])
    assert output_dir is not None and build_dir is not None
    disk = doc["disk"]
    return Pipeline(
        file=file.resolve(),
        name=doc["name"],
        source=freeze_source(doc["source"], base),
        disk=Disk(size=parse_disk_size(disk["size"]), compression=Compression(disk["compression"]),
                  flatten=disk["flatten"]),
        vm=freeze_vm(doc["vm"]),
        cloud_init=freeze_cloud_init(doc["cloud_init"], base),
        test=freeze_test(doc["test"]),
        output_dir=output_dir,
        output_keep=doc["output"]["keep"],
        build_dir=build_dir,
        cache_dir=cache_dir,
        remote=freeze_remote(doc["cache"], base),
        raw=doc,
        parent=parent,
        family=family or doc["name"],
        lock_file=lock_file or file.resolve().with_suffix(".lock"),
    )


def freeze_source(src: dict[str, Any], base: Path) -> Source:
    """The source with the distribution's own mirror and keys where the pipeline names none."""
    ver, distro = src["verify"], Distro(src["distro"])
    mirror = src["mirror"] or distros.facts(distro).mirror
    fingerprints = ver["fingerprints"] or distros.default_fingerprints(distro, str(src["release"]))
    return Source(
        release=str(src["release"]),
        arch=Arch(src["arch"]),
        mirror=mirror if mirror.endswith("/") else mirror + "/",
        channel=src["channel"],
        verify=Verify(
            signature=SignaturePolicy(ver["signature"]),
            keyring=_resolve(base, ver["keyring"]),
            fingerprints=tuple(fp.upper() for fp in fingerprints),
            sha256=ver["sha256"].lower() if ver["sha256"] else None,
        ),
        distro=distro,
    )


def freeze_vm(vm: dict[str, Any]) -> VM:
    return VM(
        cpus=vm["cpus"],
        memory_bytes=parse_size(vm["memory"]),
        accel=Accel(vm["accel"]),
        firmware=Firmware(vm["firmware"]),
        timeout_s=parse_duration(vm["timeout"]),
        qemu_args=tuple(vm["qemu_args"]),
        bake_qemu_args=tuple(vm["bake_qemu_args"]),
    )


def freeze_cloud_init(ci: dict[str, Any], base: Path) -> CloudInit:
    user_data = _resolve(base, ci["user_data"])
    assert user_data is not None
    return CloudInit(
        user_data=user_data,
        network_config=_resolve(base, ci["network_config"]),
        vendor_data=_resolve(base, ci["vendor_data"]),
        hostname=ci["hostname"],
        user=ci["user"],
        ssh_authorized_keys=tuple(ci["ssh_authorized_keys"]),
        strict=ci["strict"],
        generalize=ci["generalize"],
        ca_certs="host" if ci["ca_certs"] == "host" else tuple(_certificate_file(base, f) for f in ci["ca_certs"]),
    )


def freeze_test(test: dict[str, Any]) -> TestSettings:
    return TestSettings(
        command=test["command"],
        upload=None if test["upload"] is False else "git" if test["upload"] == "git" else tuple(test["upload"]),
        workdir=test["workdir"],
        env=tuple(sorted(test["env"].items())),
        forward=tuple(parse_forward(item) for item in test["forward"]),
        warm=test["warm"],
        timeout_s=parse_duration(test["timeout"]),
        artifacts=tuple(test["artifacts"]),
        artifacts_max_bytes=parse_size(test["artifacts_max"]),
        parallel=test["parallel"],
        shards=test["shards"],
        dependencies=Dependencies(files=tuple(test["dependencies"]["files"]),
                                  install=test["dependencies"]["install"]),
    )


def _certificate_file(base: Path, name: str) -> Path:
    resolved = _resolve(base, name)
    assert resolved is not None
    return resolved
