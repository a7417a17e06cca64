"""`chat_template` in recipes: auto, built-in names and templates, written where transformers reads it."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import yaml

from seme import chat_template
from seme.merge import main

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "w1 w2"},
                {"role": "assistant", "content": "w3"}, {"role": "user", "content": "w4"}]
RENDERED = {  # bos <s>, eos </s>
    "chatml": ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nw1 w2<|im_end|>\n<|im_start|>assistant\n"
               "w3<|im_end|>\n<|im_start|>user\nw4<|im_end|>\n<|im_start|>assistant\n"),
    "llama3": ("<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user"
               "<|end_header_id|>\n\nw1 w2<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nw3<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nw4<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
    "mistral": "<s>[INST] Be brief.\n\nw1 w2 [/INST]w3</s>[INST] w4 [/INST]",
    "exaone": "[|system|]Be brief.[|endofturn|]\n[|user|]w1 w2\n[|assistant|]w3[|endofturn|]\n[|user|]w4\n[|assistant|]",
    "alpaca": ("Be brief.\n\n### Instruction:\nw1 w2\n\n### Response:\nw3</s>\n\n### Instruction:\nw4\n\n"
               "### Response:\n"),
}


def merge(tmp_path, models, template, *extra, base=None):
    recipe = {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 1.0}} for m in models],
              "chat_template": template}
    if base:
        recipe["base_model"] = base
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe))
    return main([str(path), str(tmp_path / "out"), *extra])


def with_template(src, dst, template):
    shutil.copytree(src, dst)
    config_path = os.path.join(dst, "tokenizer_config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["chat_template"] = template
    with open(config_path, "w") as f:
        json.dump(config, f)
    return str(dst)


@pytest.mark.parametrize("name", sorted(chat_template.BUILT_IN))
def test_built_in_templates_render_their_format(name, llama_family, tmp_path):
    from transformers import AutoTokenizer

    assert merge(tmp_path, [llama_family["base"], llama_family["expert0"]], name) == 0
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer.chat_template == chat_template.BUILT_IN[name]
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True) == RENDERED[name]
    with open(tmp_path / "out" / "tokenizer_config.json") as f:  # older transformers read it from here
        assert json.load(f)["chat_template"] == chat_template.BUILT_IN[name]


def test_auto_takes_the_template_most_models_have(llama_family, tmp_path):
    from transformers import AutoTokenizer

    a, b = "{{ 'A' }}{% for m in messages %}{{ m['content'] }}{% endfor %}", "{{ 'B' }}{% for m in messages %}{% endfor %}"
    models = [with_template(llama_family["base"], tmp_path / "m0", b), with_template(llama_family["expert0"], tmp_path / "m1", a),
              with_template(llama_family["expert1"], tmp_path / "m2", a + "\n")]  # stripped before counting
    assert merge(tmp_path, models, "auto") == 0
    assert AutoTokenizer.from_pretrained(tmp_path / "out").chat_template == a


def test_a_template_in_the_recipe_is_written_as_is(llama_family, tmp_path):
    from transformers import AutoTokenizer

    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    assert merge(tmp_path, [llama_family["base"], llama_family["expert0"]], template) == 0
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer.apply_chat_template(CONVERSATION[1:2], tokenize=False) == "<user>w1 w2"


def test_a_template_with_transformers_extensions_is_accepted(llama_family, tmp_path):
    # {% generation %} (assistant masks) and {% break %} are transformers' additions to Jinja
    template = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}"
                "{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}{% if loop.index == 3 %}{% break %}"
                "{% endif %}{% endfor %}")
    assert merge(tmp_path, [llama_family["base"], llama_family["expert0"]], template) == 0
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == "Be brief.w1 w2w3"


def test_auto_without_templates_keeps_the_tokenizers(llama_family, tmp_path, capsys):
    assert merge(tmp_path, [llama_family["base"], llama_family["expert0"]], "auto") == 0
    assert "seme: warning: chat_template: auto: no input model has a chat template" in capsys.readouterr().err
    assert not (tmp_path / "out" / chat_template.FILE).exists()


def test_dry_run_shows_the_template(llama_family, tmp_path, capsys):
    assert merge(tmp_path, [llama_family["base"], llama_family["expert0"]], "chatml", "--dry-run") == 0
    assert "chat template (chatml): " in capsys.readouterr().out


@pytest.mark.parametrize("template,message", [
    (7, "chat_template must be a string"),
    ("chatmll", "chat_template 'chatmll' is neither 'auto', a built-in template (chatml, llama3, mistral, exaone, alpaca)"),
    ("{{ short }}", "is neither 'auto'"),
    # written as it was, transformers' apply_chat_template failed on the merged model
    ("{% for m in messages %}{{ m['content'] }}",
     "chat_template is not a valid Jinja template (line 1: Unexpected end of template. Jinja was looking for the "
     "following tags: 'endfor' or 'else'."),
    ("{% for m in messages %}\n{{ m['content'] }\n{% endfor %}", "not a valid Jinja template (line 2: unexpected '}')"),
])
def test_bad_templates_are_one_line_errors(template, message, llama_family, tmp_path, capsys):
    assert merge(tmp_path, [llama_family["base"], llama_family["expert0"]], template) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "out").exists()


def test_auto_names_a_template_file_it_cannot_read(llama_family, tmp_path, capsys):
    shutil.copytree(llama_family["expert0"], tmp_path / "m")
    (tmp_path / "m" / chat_template.FILE).write_bytes(b"\xff{{ messages }}")  # not UTF-8
    assert merge(tmp_path, [llama_family["base"], str(tmp_path / "m")], "auto") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"seme: error: config: chat_template: auto: cannot read {tmp_path / 'm' / chat_template.FILE}: "
                   f"'utf-8' codec can't decode byte 0xff in position 0: invalid start byte"]
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_source_without_tokenizer_files_is_refused(llama_family, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(llama_family["base"], bare,
                    ignore=lambda _, names: [n for n in names if "token" in n or n.endswith(".jinja")])
    assert merge(tmp_path, [str(bare), llama_family["expert0"]], "chatml", base=str(bare)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no tokenizer files to hold it" in err[0]
