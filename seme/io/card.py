"""The output folder's metadata: config, generation config, tokenizer and processor files, a model card and
the recipe."""
from __future__ import annotations

import json
import os
import shutil

from seme.io.model import CHAT_TEMPLATES, PROCESSOR_CHAT_TEMPLATE

PROCESSOR_CONFIG = "processor_config.json"
WHISPER_NORMALIZER = "normalizer.json"
MERGEKIT_CONFIG = "mergekit_config.yml"
SIGNATURE = "This model was merged with seme"  # how an earlier merge's output is recognised
CARD = """---
{base_models}library_name: transformers
tags:
- seme
- merge
---
# {name}

{signature} {version}
using the **{method}** method.

## Inputs
{models}

## Recipe
The merge is reproducible from this recipe alone (`python -m seme.merge recipe.yml OUT`):

```yaml
{recipe}
```
"""


def merged_by_seme(folder: str, recipe_text: str | None = None) -> bool:
    """Whether `folder` holds a merge's output: its model card says it was merged with seme (and,
    given `recipe_text`, quotes that recipe)."""
    try:
        with open(os.path.join(folder, "README.md"), encoding="utf-8") as f:
            card = f.read()
    except (OSError, UnicodeDecodeError):
        return False
    return f"{SIGNATURE} " in card and (recipe_text is None or f"```yaml\n{recipe_text.strip()}\n```" in card)


def write_metadata(folder: str, plan, version: str, name: str, tokenizer: bool = True, card: bool = True) -> None:
    """Config, generation config, tokenizer files (with `tokenizer`, or where the recipe chose a
    tokenizer), the models' code, processor files, and the model card (titled `name`) and the recipe
    (mergekit_config.yml) with `card`, into `folder`.

    The tokenizer's files and chat templates are those of the tokenizer's model (Plan.tokenizer_model),
    or a re-mapped vocabulary's tokenizer as transformers saves it (and Whisper's normalizer.json, which it
    does not save), with that model's processor
    template (chat_template.json, which tokenizers do not read); the recipe's chat_template replaces
    every template. The processor's files (image processor, feature extractor, ...) are those of the
    model whose architecture the output takes, bar a chat template in its processor_config.json,
    which follows the tokenizer's (`_processor_config`)."""
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(plan.config, f, indent=2)
        f.write("\n")
    source = plan.tokenizer_model
    built = plan.vocabulary is not None and plan.vocabulary.tokenizer is not None
    tokenizer = tokenizer or plan.recipe.tokenizer_source is not None
    files = ["generation_config.json"]
    if tokenizer:
        files += [PROCESSOR_CHAT_TEMPLATE] if built else source.tokenizer_files()
    if plan.chat_template is not None:
        files = [f for f in files if not _is_chat_template(f)]
    for file in files:
        _copy(source.path, folder, file)
    architecture = next(m for m in plan.models if m.ref == plan.recipe.reference)
    # the code the settings' auto_map names, so that the output loads with trust_remote_code as its inputs do:
    # the tokenizer's model's (tokenization_*.py) where its files were copied, the architecture's over it
    for model in ([source] if tokenizer and not built and source is not architecture else []) + [architecture]:
        for file in model.code_files():
            _copy(model.path, folder, file)
    if built:
        plan.vocabulary.tokenizer.save_pretrained(folder)
        # transformers does not save Whisper's spelling normaliser, which the vocabulary leaves as it is
        if not os.path.exists(os.path.join(folder, WHISPER_NORMALIZER)):
            _copy(source.path, folder, WHISPER_NORMALIZER)
    if plan.chat_template is not None:
        from seme import chat_template

        shutil.rmtree(os.path.join(folder, CHAT_TEMPLATES), ignore_errors=True)  # a saved tokenizer's named ones
        chat_template.write(folder, plan.chat_template)
    for file in architecture.processor_files():
        if file == PROCESSOR_CONFIG and tokenizer:
            _processor_config(architecture, source, plan.chat_template is not None, folder)
        else:
            _copy(architecture.path, folder, file)
    if not card:
        return
    recipe = plan.recipe
    models = "\n".join(f"- `{recipe.written(m.ref)}`" for m in plan.models)
    hub = recipe.hub_models  # the hub's model tree links a merge to the models its card names as base_model
    base_models = "base_model:\n" + "".join(f"- {m}\n" for m in hub) if hub else ""
    card = CARD.format(base_models=base_models, name=name, signature=SIGNATURE, version=version,
                       method=recipe.merge_method, models=models, recipe=recipe.text.strip())
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
        f.write(card)
    # beside the card, as mergekit writes it: the file merged models' repositories are read for to redo a merge
    with open(os.path.join(folder, MERGEKIT_CONFIG), "w", encoding="utf-8") as f:
        f.write(recipe.text.strip() + "\n")


def _copy(model_folder: str, folder: str, file: str) -> None:
    """`file` (a path in the folders) of `model_folder` into `folder`, where it exists."""
    src = os.path.join(model_folder, file)
    if os.path.isfile(src):
        os.makedirs(os.path.dirname(os.path.join(folder, file)), exist_ok=True)
        shutil.copyfile(src, os.path.join(folder, file))


def _is_chat_template(file: str) -> bool:
    return file in ("chat_template.jinja", PROCESSOR_CHAT_TEMPLATE) or file.startswith(CHAT_TEMPLATES + "/")


def _processor_config(architecture, source, templated: bool, folder: str) -> None:
    """The architecture's processor_config.json, its chat template (which a processor reads before any
    template file) that of the tokenizer's model, or none where the recipe sets the template."""
    def read(model) -> dict | None:
        try:
            with open(os.path.join(model.path, PROCESSOR_CONFIG), encoding="utf-8") as f:
                settings = json.load(f)
        except (OSError, ValueError):
            return None
        return settings if isinstance(settings, dict) else None

    settings = read(architecture)
    template = None if templated else (read(source) or {}).get("chat_template")
    if settings is None or settings.get("chat_template") == template:  # transformers judges a file it cannot read
        _copy(architecture.path, folder, PROCESSOR_CONFIG)
        return
    settings.pop("chat_template", None)
    if template is not None:
        settings["chat_template"] = template
    with open(os.path.join(folder, PROCESSOR_CONFIG), "w", encoding="utf-8") as f:
        json.dump(settings, f, indent=2, ensure_ascii=False)
        f.write("\n")
