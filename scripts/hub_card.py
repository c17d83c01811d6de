"""Make a committed ``peft_adapter/`` Hub-ready: write its README.md model card (with the run's test metrics) and
set ``base_model_name_or_path`` in its adapter_config.json to a Hub id. The adapter's weights and its
``miniqwen_llmtime.json`` card are left as they are.

    python scripts/hub_card.py --run results/final_search_cpu \
        --weights-label "Qwen2.5-Coder-0.5B-Instruct (dequantized)"

For adapters exported before stages wrote cards themselves (``experiments.lib.adapter_card.peft_export_args``). The
metrics are the run's ``results.json`` ``evaluations[--evaluation]`` (default "lora": the trained adapter on the
run's split); the LoRA settings come from adapter_config.json; the Hub id is ``--hub-id`` (default
``adapter_card.hub_model_id`` of the run's recorded ``--model`` name, else Qwen/Qwen2.5-0.5B-Instruct). Errors are
one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.lib.adapter_card import (DEFAULT_HUB_ID, README_FILE, evaluation_metrics, is_hub_id,  # noqa: E402
                                          model_card, read_card)
from lora import AdapterError  # noqa: E402
from miniqwen.atomic import atomic_write  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, help="a run directory with results.json and peft_adapter/")
    p.add_argument("--evaluation", default="lora", help="which evaluation of results.json the card reports")
    p.add_argument("--weights-label", help="the weights' label in the card (default: the card's base_model)")
    p.add_argument("--hub-id", help="the Hub id of the base model (default: from the run's --model)")
    args = p.parse_args(argv)
    adapter, config_path = args.run / "peft_adapter", args.run / "peft_adapter" / "adapter_config.json"
    try:
        card = read_card(adapter)
        if card is None:
            raise ValueError(f"{adapter}: no miniqwen_llmtime.json card")
        results = json.loads((args.run / "results.json").read_text(encoding="utf-8"))
        metrics, evaluated_on = evaluation_metrics(results["evaluations"][args.evaluation])
        config = json.loads(config_path.read_text(encoding="utf-8"))
        model = results.get("settings", {}).get("run", {}).get("model")
        hub_id = args.hub_id or (model if is_hub_id(model) else DEFAULT_HUB_ID)
        if not is_hub_id(hub_id):
            raise ValueError(f"--hub-id {hub_id}: not a Hub id of the form owner/name")
    except (AdapterError, OSError, ValueError, KeyError) as err:
        print(f"error: {err}".replace("\n", " "), file=sys.stderr)
        return 2
    card = dataclasses.replace(card, base_model=args.weights_label or card.base_model)
    lora = {"rank": config["r"], "alpha": config["lora_alpha"], "targets": config["target_modules"]}
    atomic_write(adapter / README_FILE, model_card(card, hub_id, lora, metrics, evaluated_on))
    atomic_write(config_path, json.dumps({**config, "base_model_name_or_path": hub_id}, indent=2) + "\n")
    print(f"{adapter}: {README_FILE} written, base_model_name_or_path = {hub_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
