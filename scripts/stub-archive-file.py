#!/usr/bin/env python3
"""Replace terraform's archive_file data sources by local values, in a copy of a module.

Each `data "archive_file" "NAME"` block becomes a local value
archive_file_NAME holding the attributes the module reads (output_path as the block
computes it, placeholder hashes of the right type), references are rewritten to it, and
hashicorp/archive leaves required_providers. The block's own arguments go unchecked.

Used by scripts/check-terraform, since hashicorp/archive cannot be obtained offline:
  stub-archive-file.py DIR   (rewrites DIR/*.tf in place; exits non-zero on a form it does not handle)
"""
import pathlib, re, sys

tree = pathlib.Path(sys.argv[1])
files = {p: p.read_text() for p in sorted(tree.glob("*.tf"))}
# Placeholder values, typed as the archive provider types them.
placeholders = {
    "output_md5": 'md5("stub")', "output_sha": 'sha1("stub")', "id": 'sha1("stub")',
    "output_sha256": 'sha256("stub")', "output_base64sha256": 'base64sha256("stub")',
    "output_sha512": 'sha512("stub")', "output_base64sha512": 'base64sha512("stub")',
    "output_size": "0",
}
block_re = re.compile(r'^data "archive_file" "(\w+)" \{\n(.*?)^\}\n', re.M | re.S)

def fail(message):
    sys.exit(f"archive stub: {message}")

stubbed = {}
for path, text in files.items():
    def replace(match):
        name, body = match.group(1), match.group(2)
        line = text[: match.start()].count("\n") + 1
        if re.search(r"^  (count|for_each)\s*=", body, re.M):
            fail(f"{path.name}:{line}: data.archive_file.{name} has count/for_each, which the stub does not handle")
        output_path = re.search(r"^  output_path\s*=\s*(.+)$", body, re.M)
        if not output_path:
            fail(f"{path.name}:{line}: data.archive_file.{name} has no one-line output_path")
        stubbed[name] = (path.name, line, output_path.group(1))
        return f"__ARCHIVE_STUB_{name}__\n"
    files[path] = block_re.sub(replace, text)

everything = "\n".join(files.values())
for name, (file_name, line, output_path) in stubbed.items():
    attributes = sorted(set(re.findall(rf"\bdata\.archive_file\.{name}\.(\w+)", everything)))
    if re.search(rf"\bdata\.archive_file\.{name}\b(?!\.\w)", everything):
        fail(f"data.archive_file.{name} is referenced whole (e.g. in depends_on); the stub supports only attribute references")
    values = {"output_path": output_path}
    for attribute in attributes:
        if attribute == "output_path":
            continue
        if attribute not in placeholders:
            fail(f"data.archive_file.{name}.{attribute}: no placeholder for this attribute")
        values[attribute] = placeholders[attribute]
    width = max(map(len, values))
    body = "\n".join(f"    {key.ljust(width)} = {value}" for key, value in values.items())
    local = f"locals {{\n  # stub of the archive_file data source {name}\n  archive_file_{name} = {{\n{body}\n  }}\n}}\n"
    for path in files:
        files[path] = files[path].replace(f"__ARCHIVE_STUB_{name}__\n", local)
        files[path] = re.sub(rf"\bdata\.archive_file\.{name}\.", f"local.archive_file_{name}.", files[path])
    print(f"stub: data.archive_file.{name} ({file_name}:{line}) -> local.archive_file_{name} "
          f"{{{', '.join(values)}}}; its own arguments are not validated")

for path, text in files.items():
    text = re.sub(r'^[ \t]*archive[ \t]*=[ \t]*\{[^{}]*?source[ \t]*=[ \t]*"hashicorp/archive"[^{}]*\}[ \t]*\n', "", text, flags=re.M)
    files[path] = text
    leftover = re.search(r'data "archive_file"|\bdata\.archive_file\.|hashicorp/archive', text)
    if leftover:
        line = text[: leftover.start()].count("\n") + 1
        fail(f"{path.name}:{line}: '{leftover.group(0)}' is left after stubbing (a form the stub does not handle)")
    path.write_text(text)
