"""The NoCloud seed: validation, the merge, and a reproducible ISO read back by pycdlib and the OS."""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pycdlib
import pytest
import yaml

from cloudbake.config.pipeline import load_pipeline
from cloudbake.core.errors import PipelineError
from cloudbake.image.seed import (
    GENERALIZED_MARKER,
    RESULT_MARKER,
    SeedFiles,
    build_seed_files,
    build_seed_iso,
    seed_iso_bytes,
)

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPseedtestkeyseedtestkeyseedtestkeyseedtest test@host"


def _user_data(files: SeedFiles) -> dict:
    text = files.user_data.decode()
    assert text.startswith("#cloud-config\n")
    return yaml.safe_load(text)


def test_merge_adds_user_keys_and_power_off(make_pipeline, tmp_path):
    (tmp_path / "me.pub").write_text(KEY + "\n")
    pipeline = load_pipeline(make_pipeline("cloud_init:\n  user: dev\n  ssh_authorized_keys: [me.pub]\n"))
    doc = _user_data(build_seed_files(pipeline))
    assert doc["packages"] == ["curl"]  # the user's keys are kept
    dev = next(u for u in doc["users"] if isinstance(u, dict) and u["name"] == "dev")
    assert dev["sudo"] == "ALL=(ALL) NOPASSWD:ALL"
    assert dev["ssh_authorized_keys"] == [KEY]
    assert doc["power_state"]["mode"] == "poweroff"
    script = doc["power_state"]["condition"][2]
    assert RESULT_MARKER in script and GENERALIZED_MARKER in script and "cloud-init clean" in script


def test_users_own_entry_wins_and_gets_the_keys(make_pipeline):
    user_data = textwrap.dedent(f"""\
        #cloud-config
        users:
          - name: ubuntu
            shell: /bin/zsh
            ssh_authorized_keys: ["{KEY}"]
        """)
    other = KEY.replace("seedtest", "othertest")
    pipeline = load_pipeline(make_pipeline(f'cloud_init:\n  ssh_authorized_keys: ["{other}"]\n', user_data=user_data))
    doc = _user_data(build_seed_files(pipeline))
    assert len(doc["users"]) == 1
    assert doc["users"][0]["shell"] == "/bin/zsh"
    assert "sudo" not in doc["users"][0]
    assert doc["users"][0]["ssh_authorized_keys"] == [KEY, other]


# The founding user's own vm/user-data: list-form sudo rules (what cloud-init's docs and the seed show), an
# empty key list their script filled before building the seed, and the seed's own power_state form.
FAAS_USER_DATA = """\
#cloud-config
users:
  - name: faas
    sudo: ['ALL=(ALL) NOPASSWD: /sbin/poweroff', 'ALL=(ALL) NOPASSWD: /usr/sbin/ip']
    shell: /bin/bash
    ssh_authorized_keys:
  - name: ubuntu
    sudo: ['ALL=(ALL) NOPASSWD:ALL']
    ssh_authorized_keys: []
packages: [nftables]
power_state: {mode: poweroff, delay: now}
"""


def test_a_real_users_file_loads_and_empty_key_lists_get_cloudbakes_keys(make_pipeline, caplog):
    import logging

    from cloudbake.image.seed import placeholder_users

    caplog.set_level(logging.WARNING, logger="cloudbake")
    other = KEY.replace("seedtest", "othertest")
    pipeline = load_pipeline(make_pipeline(f'name: faas\ncloud_init:\n  ssh_authorized_keys: ["{other}"]\n',
                                           user_data=FAAS_USER_DATA))
    doc = _user_data(build_seed_files(pipeline))
    faas, ubuntu = doc["users"]
    assert faas["sudo"] == ["ALL=(ALL) NOPASSWD: /sbin/poweroff", "ALL=(ALL) NOPASSWD: /usr/sbin/ip"]
    assert faas["ssh_authorized_keys"] == [other] and ubuntu["ssh_authorized_keys"] == [other]
    assert "users faas, ubuntu: an empty ssh_authorized_keys is read as a placeholder" in caplog.text
    assert placeholder_users(pipeline) == ["faas"]   # cloudbake's own user gets each run's key anyway


def test_a_placeholder_user_gets_each_runs_key(make_pipeline):
    from cloudbake.run.runs import run_seed_files

    pipeline = load_pipeline(make_pipeline("name: faas\n", user_data=FAAS_USER_DATA))
    merged = _user_data(build_seed_files(pipeline))
    assert all("ssh_authorized_keys" not in user for user in merged["users"])   # no keys at bake: none, not null
    seed = run_seed_files(pipeline, KEY, "PRIVATE", "ssh-ed25519 HOST", "iid")
    users = {user["name"]: user for user in _user_data(seed)["users"]}
    assert users["faas"]["ssh_authorized_keys"] == [KEY] and users["ubuntu"]["ssh_authorized_keys"] == [KEY]


@pytest.mark.parametrize(("user_data", "fragment"), [
    ("#cloud-config\nusers:\n  - name: a\n    lock-passwd: true\n",
     "users[0].lock-passwd: deprecated since cloud-init 22.3: Use **lock_passwd** instead."),
    ("#cloud-config\napt_update: true\n", "apt_update: deprecated since cloud-init 22.2: Use **package_update**"),
])
def test_deprecated_keys_are_warnings_naming_the_modern_form(make_pipeline, caplog, user_data, fragment):
    import logging

    caplog.set_level(logging.WARNING, logger="cloudbake")
    build_seed_files(load_pipeline(make_pipeline("name: t\n", user_data=user_data)))
    assert fragment in caplog.text


def test_a_value_cloud_init_cannot_run_is_still_an_error(make_pipeline):
    with pytest.raises(PipelineError, match=r"users\[0\]\.sudo: .*is not valid under any of the given schemas|"
                                            r"users\[0\]\.sudo: 5 is not of type"):
        build_seed_files(load_pipeline(make_pipeline("name: t\n", user_data="#cloud-config\nusers:\n  - name: a\n"
                                                                   "    sudo: 5\n")))


def test_generalize_off_leaves_identity(make_pipeline):
    pipeline = load_pipeline(make_pipeline("cloud_init: {generalize: false}\n"))
    doc = _user_data(build_seed_files(pipeline))
    assert "cloud-init clean" not in doc["power_state"]["condition"][2]
    assert "ssh_genkeytypes" not in doc   # the image keeps the host keys the bake makes


def test_a_generalizing_bake_makes_no_host_keys_that_it_would_delete(make_pipeline):
    pipeline = load_pipeline(make_pipeline("name: keys\n"))
    assert _user_data(build_seed_files(pipeline))["ssh_genkeytypes"] == []
    assert "ssh_genkeytypes" not in _user_data(build_seed_files(pipeline, for_bake=False))
    own = load_pipeline(make_pipeline("name: keys\n", user_data="#cloud-config\nssh_genkeytypes: [ed25519]\n"))
    assert _user_data(build_seed_files(own))["ssh_genkeytypes"] == ["ed25519"]


def test_users_power_state_keeps_its_delay(make_pipeline):
    pipeline = load_pipeline(make_pipeline(
        "name: t\n", user_data="#cloud-config\npower_state: {mode: poweroff, delay: '+1', message: bye}\n"))
    state = _user_data(build_seed_files(pipeline))["power_state"]
    assert (state["delay"], state["message"], state["mode"]) == ("+1", "bye", "poweroff")


def test_meta_data_instance_id_follows_content(make_pipeline):
    pipeline = load_pipeline(make_pipeline("cloud_init: {hostname: box1}\n"))
    first = yaml.safe_load(build_seed_files(pipeline).meta_data)
    assert first["local-hostname"] == "box1"
    assert first["instance-id"].startswith("cloudbake-")
    assert yaml.safe_load(build_seed_files(pipeline).meta_data) == first
    changed = load_pipeline(make_pipeline("cloud_init: {hostname: box1}\n",
                                          user_data="#cloud-config\npackages: [git]\n"))
    assert yaml.safe_load(build_seed_files(changed).meta_data)["instance-id"] != first["instance-id"]


BAD_USER_DATA = [
    ("packages: [curl]\n", "user-data must start with the line '#cloud-config'"),
    ("#!/bin/sh\necho hi\n", "user-data is a shell script"),
    ("Content-Type: multipart/mixed\n", "MIME multi-part"),
    ("#cloud-config\npackages: [curl\n", "user-data.yaml:3:1: YAML syntax error"),
    ("#cloud-config\npower_state:\n  mode: off\n", "user-data.yaml:3:9: power_state.mode: False is not one of"),
    ("#cloud-config\npower_state:\n  mode: reboot\n", "user-data.yaml:3:9: power_state.mode: 'reboot' would keep"),
    ("#cloud-config\npower_state:\n  mode: poweroff\n  condition: true\n", "user-data.yaml:4:14: power_state.condition"),
    ("#cloud-config\npackages: curl\n", "user-data.yaml:2:11: packages: 'curl' is not of type 'array'"),
    ("#cloud-config\nruncmd: echo hi\n", "user-data.yaml:2:9: runcmd: 'echo hi' is not of type 'array'"),
    ("#cloud-config\nwrite_files:\n  - content: x\n", "user-data.yaml:3:5: write_files[0]: 'path' is a required property"),
    ("#cloud-config\nusers:\n  - name: bob\n    shel: /bin/sh\n", "users[0].shel: unknown key (did you mean 'shell'?)"),
    ("#cloud-config\nssh_pwauth: [yes]\n", "user-data.yaml:2:13: ssh_pwauth"),
    # Type errors cloudbake's earlier hand-written subset let through, caught by cloud-init's own schema:
    ("#cloud-config\nsnap:\n  commands: 42\n", "user-data.yaml:3:13: snap.commands: 42 is not of type 'object', 'array'"),
    ("#cloud-config\nchpasswd:\n  expire: sometimes\n", "user-data.yaml:3:11: chpasswd.expire: 'sometimes' is not of type 'boolean'"),
    ("#cloud-config\nmounts: /dev/vdb\n", "user-data.yaml:2:9: mounts: '/dev/vdb' is not of type 'array'"),
    ("#cloud-config\nssh_genkeytypes: [ed25519, rsa4096]\n", "ssh_genkeytypes[1]: 'rsa4096' is not one of: ecdsa, ed25519, rsa"),
    ("#cloud-config\npackage_update: 1\n", "package_update: 1 is not of type 'boolean'"),
]


@pytest.mark.parametrize(("user_data", "expected"), BAD_USER_DATA, ids=[b[1][:40] for b in BAD_USER_DATA])
def test_bad_user_data_is_refused_before_any_iso(make_pipeline, tmp_path, user_data, expected):
    pipeline = load_pipeline(make_pipeline("name: t\n", user_data=user_data))
    with pytest.raises(PipelineError) as caught:
        build_seed_files(pipeline)
    assert expected in str(caught.value)


def test_all_user_data_problems_at_once(make_pipeline):
    pipeline = load_pipeline(make_pipeline("name: t\n", user_data="#cloud-config\npackages: curl\npackage_update: 1\n"))
    with pytest.raises(PipelineError) as caught:
        build_seed_files(pipeline)
    assert "2 problems" in str(caught.value)


def test_unknown_key_warns_with_suggestion(make_pipeline, caplog):
    pipeline = load_pipeline(make_pipeline("name: t\n", user_data="#cloud-config\npacakges: [curl]\n"))
    build_seed_files(pipeline)
    assert "user-data.yaml:2:1: pacakges: unknown cloud-config key (did you mean 'packages'?)" in caplog.text


def test_unknown_key_is_an_error_when_strict(make_pipeline):
    pipeline = load_pipeline(make_pipeline("cloud_init: {strict: true}\n", user_data="#cloud-config\npacakges: [x]\n"))
    with pytest.raises(PipelineError, match="did you mean 'packages'"):
        build_seed_files(pipeline)


def test_passthrough_keys_are_not_unknown(make_pipeline, caplog):
    pipeline = load_pipeline(make_pipeline("name: t\n", user_data="#cloud-config\nsnap: {commands: [snap install jq]}\n"
                                                           "chpasswd: {expire: false}\nmerge_how: dict(replace)\n"))
    build_seed_files(pipeline)
    assert "unknown" not in caplog.text


def test_key_file_that_is_not_a_public_key(make_pipeline, tmp_path):
    (tmp_path / "id").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    pipeline = load_pipeline(make_pipeline("cloud_init: {ssh_authorized_keys: [id]}\n"))
    with pytest.raises(PipelineError, match="does not hold an OpenSSH public key"):
        build_seed_files(pipeline)


def test_glob_matching_nothing_only_warns(make_pipeline, caplog):
    pipeline = load_pipeline(make_pipeline("cloud_init: {ssh_authorized_keys: ['nokeys/*.pub']}\n"))
    build_seed_files(pipeline)
    assert "no public key matches nokeys/*.pub" in caplog.text


def test_network_config_must_have_a_version(make_pipeline, tmp_path):
    (tmp_path / "cloud-init" / "net.yaml").parent.mkdir(exist_ok=True)
    (tmp_path / "cloud-init" / "net.yaml").write_text("ethernets: {}\n")
    pipeline = load_pipeline(make_pipeline("cloud_init: {network_config: cloud-init/net.yaml}\n"))
    with pytest.raises(PipelineError, match="version: 1' or 'version: 2"):
        build_seed_files(pipeline)


def test_host_cloud_init_schema_check_is_used_when_present(make_pipeline, tmp_path, monkeypatch):
    """A stand-in cloud-init (the real interpreter) that rejects: its verdict reaches the user."""
    fake = tmp_path / "bin" / "cloud-init"
    fake.parent.mkdir()
    fake.write_text(f"#!{sys.executable}\nimport sys\nprint('Error: Cloud config schema errors: bogus')\nsys.exit(1)\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    pipeline = load_pipeline(make_pipeline("name: t\n"))
    with pytest.raises(PipelineError, match=r"(?s)cloud-init's own schema check rejected.*bogus"):
        build_seed_files(pipeline)


# --- the ISO ---------------------------------------------------------------------------

FILES = SeedFiles(b"#cloud-config\n{}\n", b"instance-id: i-1\nlocal-hostname: h\n", b"version: 2\n")


def test_iso_reads_back_with_pycdlib():
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(seed_iso_bytes(FILES)))
    try:
        assert iso.pvd.volume_identifier.rstrip(b" ") == b"cidata"
        for name, data in FILES.items():
            for kind in ("rr_path", "joliet_path"):
                out = io.BytesIO()
                iso.get_file_from_iso_fp(out, **{kind: "/" + name})
                assert out.getvalue() == data
    finally:
        iso.close()


def test_iso_is_byte_identical_across_runs_and_time_zones(tmp_path):
    code = ("import sys,time; sys.path.insert(0, sys.argv[1]); from tests.image.test_seed import FILES; "
            "from cloudbake.image.seed import seed_iso_bytes; time.sleep(1.1); sys.stdout.buffer.write(seed_iso_bytes(FILES))")
    root = str(Path(__file__).resolve().parents[2])
    outputs = {
        subprocess.run([sys.executable, "-c", code, root], capture_output=True, check=True,
                       env={**os.environ, "TZ": tz}).stdout
        for tz in ("UTC", "Asia/Kathmandu", "America/St_Johns")
    }
    assert len(outputs) == 1
    assert seed_iso_bytes(FILES) in outputs


def test_changed_content_changes_bytes():
    changed = SeedFiles(FILES.user_data + b"# x\n", FILES.meta_data, FILES.network_config)
    assert seed_iso_bytes(changed) != seed_iso_bytes(FILES)


@pytest.mark.parametrize(("epoch", "expected"), [
    ("1700000000", (2023, 11, 14, 22, 13, 20)),  # SOURCE_DATE_EPOCH as given, in UTC
    (None, (2000, 1, 1, 0, 0, 0)),               # unset: cloudbake's fixed default
])
def test_source_date_epoch_sets_the_iso_dates(monkeypatch, epoch, expected):
    import io

    import pycdlib

    if epoch is None:
        monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    else:
        monkeypatch.setenv("SOURCE_DATE_EPOCH", epoch)
    monkeypatch.setenv("TZ", "Asia/Kathmandu")  # +05:45: a leak of local time would show
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(seed_iso_bytes(FILES)))
    try:
        date = iso.pvd.volume_creation_date
        assert (date.year, date.month, date.dayofmonth, date.hour, date.minute, date.second) == expected
        assert date.gmtoffset == 0
    finally:
        iso.close()


def test_write_is_atomic_and_leaves_no_temp(tmp_path):
    dest = tmp_path / "seed.iso"
    build_seed_iso(FILES, dest)
    assert [p.name for p in tmp_path.iterdir()] == ["seed.iso"]
    assert stat.S_IMODE(dest.stat().st_mode) == 0o644


@pytest.mark.skipif(shutil.which("isoinfo") is None or shutil.which("blkid") is None, reason="needs genisoimage, util-linux")
def test_os_tools_see_label_and_names(tmp_path):
    dest = tmp_path / "seed.iso"
    build_seed_iso(FILES, dest)
    blkid = subprocess.run(["blkid", str(dest)], capture_output=True, text=True, check=True).stdout
    assert 'LABEL="cidata"' in blkid and 'TYPE="iso9660"' in blkid
    for flag in ("-R", "-J"):
        listing = subprocess.run(["isoinfo", flag, "-f", "-i", str(dest)], capture_output=True, text=True,
                                 check=True).stdout.split()
        assert {"/user-data", "/meta-data", "/network-config"} <= set(listing)


@pytest.mark.parametrize(("data", "fragment"), [
    (b"#cloud-config\nruncmd: ['\xff\xfe']\n", "user-data.yaml:2:1: user-data is not UTF-8 text (byte 0xff"),
    (__import__("gzip").compress(b"#cloud-config\nruncmd: [ls]\n"), "user-data is gzip-compressed"),
    (b"#cloud-config\n" + b"a: &a [x, x, x, x, x, x, x, x, x, x]\n" + b"".join(
        b"%c: &%c [" % (98 + i, 98 + i) + b", ".join([b"*%c" % (97 + i)] * 10) + b"]\n" for i in range(8)),
     "expand to more than 100,000 values"),
    (b"#cloud-config\nx: " + b"[" * 3000 + b"]" * 3000 + b"\n", "nested more than 64 levels deep"),
])
def test_hostile_user_data_is_a_clear_error(make_pipeline, tmp_path, data, fragment):
    pipeline = load_pipeline(make_pipeline("name: hostile\n"))
    (tmp_path / "cloud-init" / "user-data.yaml").write_bytes(data)
    with pytest.raises(PipelineError) as caught:
        build_seed_files(pipeline)
    assert fragment in str(caught.value)


def test_key_file_that_is_not_utf8(make_pipeline, tmp_path):
    (tmp_path / "bin.pub").write_bytes(b"ssh-ed25519 \xff\xfe\x00")
    pipeline = load_pipeline(make_pipeline("cloud_init: {ssh_authorized_keys: [bin.pub]}\n"))
    with pytest.raises(PipelineError, match="is not UTF-8 text"):
        build_seed_files(pipeline)


def test_a_fedora_bake_restores_selinux_labels_and_other_bakes_are_as_they_were(make_pipeline):
    """Fedora enforces SELinux: what the bake wrote gets its labels back before power-off. Ubuntu's and
    Debian's finish scripts (and so Ubuntu's keys) do not change."""
    from cloudbake.image.seed import bake_finish_script, build_seed_files

    fedora = load_pipeline(make_pipeline("source: {distro: fedora, release: 42}\n"))
    ubuntu = load_pipeline(make_pipeline("source: {distro: ubuntu}\n"))
    assert "restorecon -R /etc" in build_seed_files(fedora, for_bake=True).user_data.decode()
    assert "restorecon" not in build_seed_files(ubuntu, for_bake=True).user_data.decode()
    assert bake_finish_script(True) == bake_finish_script(True, relabel=False)


def test_dependency_files_are_staged_and_installed_as_the_run_user_at_the_end(make_pipeline, tmp_path):
    """test.dependencies: the files travel in the seed (so the key covers them), deferred until the users
    exist; after the user's own runcmd they are copied into test.workdir and `install` runs there."""
    import base64

    from cloudbake.image.seed import DEPENDENCY_STAGING

    (tmp_path / "uv.lock").write_text("version = 1\n")
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'faas'\n")
    (tmp_path / "reqs").mkdir()
    (tmp_path / "reqs" / "a.txt").write_text("x==1\n")
    pipeline = load_pipeline(make_pipeline(
        "name: t\ncloud_init: {user: faas}\ntest:\n  workdir: ~/code\n  dependencies:\n"
        "    files: [pyproject.toml, uv.lock, 'reqs/**/*.txt']\n    install: uv sync --frozen\n",
        user_data="#cloud-config\nruncmd: [[echo, mine]]\n"))
    doc = _user_data(build_seed_files(pipeline))
    staged = {entry["path"]: entry for entry in doc["write_files"]}
    assert set(staged) == {f"{DEPENDENCY_STAGING}/{name}" for name in ("pyproject.toml", "reqs/a.txt", "uv.lock")}
    assert base64.b64decode(staged[f"{DEPENDENCY_STAGING}/uv.lock"]["content"]) == b"version = 1\n"
    assert all(entry["defer"] is True for entry in staged.values())
    assert doc["runcmd"][0] == ["echo", "mine"]
    step = doc["runcmd"][-1][2]
    assert step.startswith("su -l faas -c ") and step.endswith(f"&& rm -rf {DEPENDENCY_STAGING}")
    assert 'cd "$HOME"/code' in step and "uv sync --frozen" in step
    # The test run's seed re-applies nothing of it: only the bake installs.
    assert "write_files" not in _user_data(build_seed_files(pipeline, for_bake=False))


def test_the_key_covers_the_dependency_files_content_and_nothing_else(make_pipeline, tmp_path):
    from cloudbake.config.paths import resolve_paths
    from cloudbake.image.build import compute_key, key_inputs
    from cloudbake.source.lock import Lock

    (tmp_path / "uv.lock").write_text("version = 1\n")
    (tmp_path / "test_app.py").write_text("def test(): pass\n")
    pipeline = load_pipeline(make_pipeline("name: t\ntest: {dependencies: {files: [uv.lock], install: make}}\n"))
    lock = Lock(source={"release": "x"}, url="u", serial="1", sha256="a" * 64, size=1, signed_by=None,
                signature_time=None)
    assert resolve_paths(pipeline)

    def key() -> str:
        return compute_key(key_inputs(pipeline, lock, build_seed_files(pipeline)))

    first = key()
    (tmp_path / "test_app.py").write_text("def test(): assert 1\n")
    assert key() == first
    (tmp_path / "uv.lock").write_text("version = 2\n")
    assert key() != first


@pytest.mark.parametrize(("files", "fragment"), [
    ("[missing.lock]", "'missing.lock' matches no file"),
    ("[outside.lock]", "outside.lock leads out of"),
])
def test_dependency_files_that_cannot_be_baked_are_refused(make_pipeline, tmp_path, files, fragment):
    outside = tmp_path.parent / f"{tmp_path.name}-outside.lock"
    outside.write_text("secret\n")
    (tmp_path / "outside.lock").symlink_to(outside)
    pipeline = load_pipeline(make_pipeline(f"name: t\ntest: {{dependencies: {{files: {files}}}}}\n"))
    with pytest.raises(PipelineError, match=fragment):
        build_seed_files(pipeline)
