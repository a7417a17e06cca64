"""The recipe's `chat_template` (as mergekit reads it): `auto` (the template most of the input models
share), the name of a built-in template, or a Jinja template itself. It is written into the output's
tokenizer files, where transformers' `apply_chat_template` finds it."""
from __future__ import annotations

import json
import os
from collections import Counter

from seme.errors import SemeError

# The common conversation formats, each as its model family documents it.
BUILT_IN = {
    "chatml": ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
               "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
               "{% endif %}"),
    "llama3": ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
               "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"),
    "mistral": ("{{ bos_token }}{% set ns = namespace(system='') %}{% for message in messages %}"
                "{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\\n\\n' %}"
                "{% elif message['role'] == 'user' %}{{ '[INST] ' + ns.system + message['content'] + ' [/INST]' }}"
                "{% set ns.system = '' %}{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"),
    "exaone": ("{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
               "{{ '[|system|][|endofturn|]\\n' }}{% endif %}{{ '[|' + message['role'] + '|]' + message['content'] }}"
               "{% if message['role'] == 'user' %}{{ '\\n' }}{% else %}{{ '[|endofturn|]\\n' }}{% endif %}{% endfor %}"
               "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"),
    "alpaca": ("{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
               "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
               "{% else %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}{% endif %}{% endfor %}"
               "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"),
}
FILE = "chat_template.jinja"  # where transformers (>= 4.47) saves and first looks for it


def check(value) -> str:
    """The recipe's value, validated: mergekit's rule (a template has a '{' and 20 characters or more)."""
    if not isinstance(value, str) or not value.strip():
        raise SemeError(f"config: chat_template must be a string, got {value!r}")
    if value != "auto" and value not in BUILT_IN and (len(value) < 20 or "{" not in value):
        raise SemeError(f"config: chat_template {value!r} is neither 'auto', a built-in template "
                        f"({', '.join(BUILT_IN)}) nor a Jinja template")
    if value != "auto" and value not in BUILT_IN:
        error = _syntax_error(value)
        if error:
            raise SemeError(f"config: chat_template is not a valid Jinja template ({error})")
    return value


def _syntax_error(template: str) -> str | None:
    """Where `template` fails to parse as transformers compiles it (with its loop controls and its
    `{% generation %}` blocks); None if it parses, or without jinja2 (transformers cannot apply a
    template then either)."""
    try:
        import jinja2
        import jinja2.ext
        import jinja2.nodes
    except ImportError:
        return None

    class Generation(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    try:
        jinja2.Environment(extensions=[Generation, jinja2.ext.loopcontrols]).parse(template)
    except jinja2.TemplateSyntaxError as e:
        return f"line {e.lineno}: {e.message}"
    return None


def of_model(folder: str) -> str | None:
    """A model folder's chat template: its chat_template.jinja, else tokenizer_config.json's (the
    'default' one where it names several)."""
    path = os.path.join(folder, FILE)
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise SemeError(f"config: chat_template: auto: cannot read {path}: {e}") from None
    try:
        with open(os.path.join(folder, "tokenizer_config.json"), encoding="utf-8") as f:
            template = json.load(f).get("chat_template")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(template, list):  # [{"name": ..., "template": ...}]
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    return template if isinstance(template, str) and template.strip() else None


def resolve(value: str | None, model_folders: list[str]) -> str | None:
    """The template to write: `auto` takes the one most input models have (the first met on a tie;
    None, with a warning, when none has one)."""
    if value is None:
        return None
    if value == "auto":
        found = [t.strip() for t in map(of_model, model_folders) if t]
        if not found:
            import warnings

            warnings.warn("chat_template: auto: no input model has a chat template; the tokenizer's is kept")
            return None
        return Counter(found).most_common(1)[0][0]
    return BUILT_IN.get(value, value)


def write(folder: str, template: str) -> None:
    """Set the template of the tokenizer files in `folder`: chat_template.jinja, and
    tokenizer_config.json's entry for transformers that read only that."""
    with open(os.path.join(folder, FILE), "w", encoding="utf-8") as f:
        f.write(template)
    path = os.path.join(folder, "tokenizer_config.json")
    config = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    config["chat_template"] = template
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")
