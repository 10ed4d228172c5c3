#!/usr/bin/env python3
"""Compiles every Rust snippet of README.md as a new user would: in a fresh edition-2024 crate
outside the workspace, with the dependencies the README's ```toml blocks name (merged; features
of one crate add up; paths point at this checkout). A ```rust block becomes one binary; a block
without `fn main` gets an empty one, so item-level snippets compile too.

    python3 scripts/readme_snippets.py   # exit status 0 when every snippet builds
"""
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```", re.S | re.M)


def blocks(text, language):
    return [body for lang, body in FENCE.findall(text) if lang == language]


def merged_dependencies(toml_blocks):
    """One dependency table from every block: later keys win, `features` lists add up."""
    deps = {}
    for block in toml_blocks:
        for name, spec in tomllib.loads(block).get("dependencies", {}).items():
            if isinstance(spec, str):
                spec = {"version": spec}
            old = deps.get(name, {})
            features = sorted(set(old.get("features", [])) | set(spec.get("features", [])))
            deps[name] = {**old, **spec, **({"features": features} if features else {})}
            if "path" in deps[name]:
                # The README points at a checkout next to the service; here, at this one.
                deps[name]["path"] = str(ROOT / pathlib.PurePosixPath(deps[name]["path"]).name)
    return deps


def toml_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def manifest(deps):
    lines = ['[package]', 'name = "readme-snippets"', 'version = "0.0.0"', 'edition = "2024"',
             'publish = false', '', '[workspace]', '', '[dependencies]']
    for name, spec in sorted(deps.items()):
        inner = ", ".join(f"{k} = {toml_value(v)}" for k, v in spec.items())
        lines.append(f"{name} = {{ {inner} }}")
    return "\n".join(lines) + "\n"


def main():
    readme = (ROOT / "README.md").read_text()
    rust = blocks(readme, "rust")
    deps = merged_dependencies(blocks(readme, "toml"))
    if not rust or not deps:
        sys.exit("README.md has no ```rust or ```toml blocks: nothing to check")
    crate = pathlib.Path(tempfile.mkdtemp(prefix="readme-snippets-"))
    try:
        (crate / "Cargo.toml").write_text(manifest(deps))
        # The workspace's versions and target directory: the dependencies the test step has
        # just built are reused (no RUSTFLAGS, which would rebuild them all).
        shutil.copy(ROOT / "Cargo.lock", crate / "Cargo.lock")
        bins = crate / "src" / "bin"
        bins.mkdir(parents=True)
        for n, body in enumerate(rust, start=1):
            if not re.search(r"\bfn main\s*\(", body):
                body += "\nfn main() {}\n"
            (bins / f"snippet_{n:02}.rs").write_text("#![allow(dead_code, unused)]\n" + body)
        print(f"building {len(rust)} README snippets in an edition-2024 crate ({crate})")
        env = dict(os.environ, CARGO_TARGET_DIR=str(ROOT / "target"))
        result = subprocess.run(["cargo", "build", "--quiet", "--bins"], cwd=crate, env=env)
        if result.returncode != 0:
            for n, body in enumerate(rust, start=1):
                print(f"--- snippet_{n:02}.rs (README ```rust block {n}) ---\n{body}")
            sys.exit("a README snippet does not compile as written (see above)")
        print("every README snippet compiles")
    finally:
        shutil.rmtree(crate, ignore_errors=True)


if __name__ == "__main__":
    main()
