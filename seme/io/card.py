"""The output folder's metadata: config, generation config, tokenizer files and a model card."""
from __future__ import annotations

import json
import os
import shutil

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
    tokenizer) and the model card (titled `name`; with `card`) into `folder`."""
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(plan.config, f, indent=2)
        f.write("\n")
    ref = plan.tokenizer_model
    union = plan.vocabulary is not None and plan.vocabulary.tokenizer is not None
    tokenizer = tokenizer or plan.recipe.tokenizer_source is not None
    for file in ["generation_config.json"] + ([] if union or not tokenizer else ref.tokenizer_files()):
        src = os.path.join(ref.path, file)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(folder, file))
    if union:
        plan.vocabulary.tokenizer.save_pretrained(folder)
    if plan.chat_template is not None:
        from seme import chat_template

        chat_template.write(folder, plan.chat_template)
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
