"""The model card of a folder output (README.md, docs: README "Model card and recipe"), read as
the Hugging Face Hub's Python library reads it: the front matter with PyYAML's `safe_load`. The
tool writes each value in JSON (YAML's flow style); this checks that a YAML reader other than
the tool's own gets back exactly the values meant, for strings that YAML would otherwise read
as something else (a colon, a leading `#` or `*`, quotes, `yes`, a number, non-ASCII)."""

import json
import shutil

import yaml

from sotu_bin import REPO, run

TRICKY_NAME = 'acme/model: "v2" #1 *é* yes'
BASE_CARD = """---
license: other
license_name: 'my: license, "quoted" #1'
license_link: [https://example.com/a, "2024"]
tags: [ignored]
---

# The base
"""


def front_matter(path):
    text = path.read_text(encoding="utf-8")
    assert text.startswith("---\n"), text
    yaml_text, _, body = text[4:].partition("\n---\n")
    return yaml.safe_load(yaml_text), body


def test_a_card_reads_back_in_pyyaml_with_the_values_meant(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    shutil.copy(REPO / "fixtures/tiny/base-f32.safetensors", base / "model.safetensors")
    (base / "config.json").write_text(json.dumps({"_name_or_path": TRICKY_NAME}))
    (base / "README.md").write_text(BASE_CARD, encoding="utf-8")
    delta = tmp_path / "d.st"
    run("extract", "--base", base / "model.safetensors", "--tuned",
        REPO / "fixtures/tiny/task1-f32.safetensors", "--density", "0.5", "-o", delta)
    run("merge", "--base", base, delta, delta, "-o", tmp_path / "merged")
    run("apply", "--base", base, delta, "-o", tmp_path / "applied")
    for out, relation, tags in [("merged", "merge", ["sotu-delta", "merge"]),
                                ("applied", "finetune", ["sotu-delta"])]:
        front, body = front_matter(tmp_path / out / "README.md")
        assert front == {
            "base_model": TRICKY_NAME,
            "base_model_relation": relation,
            "tags": tags,
            "library_name": "transformers",
            "license": "other",
            "license_name": 'my: license, "quoted" #1',
            "license_link": ["https://example.com/a", "2024"],
        }, out
        assert TRICKY_NAME in body, out
