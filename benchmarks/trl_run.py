"""The TRL side of benchmarks/e2e.py: an easydistill JSON config run through TRL, as a TRL user would.

    python -m benchmarks.trl_run --config cfg.json          # GKDTrainer (lmbda 0) with the config's settings
    python -m benchmarks.trl_run --config cfg.json --sft    # SFTTrainer on the same records (LoRA if the config has it)

Reads the models, records ({"instruction", "output"} JSONL, given to TRL as chat messages), the divergence
(JSD beta, temperature), max_seq_length, LoRA and the `training` keys both tools share; a "self" teacher becomes
a second copy of the student's base weights (TRL has no self-teacher). Trains, then saves like TRL's scripts.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

SHARED_TRAINING_KEYS = (
    "output_dir",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "logging_steps",
    "save_strategy",
    "report_to",
    "seed",
    "disable_tqdm",
)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.trl_run", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--sft", action="store_true", help="SFTTrainer instead of GKDTrainer")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer

    raw = json.loads(Path(args.config).read_text())
    models, distill, training = raw["models"], raw.get("distillation", {}), raw["training"]
    tokenizer = AutoTokenizer.from_pretrained(models["student"])
    lines = Path(raw["dataset"]["labeled_path"]).read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    chats = [
        [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]
        for r in records
    ]
    dataset = Dataset.from_dict({"messages": chats})
    common = {k: training[k] for k in SHARED_TRAINING_KEYS if k in training}
    common.update(use_cpu=True, bf16=False, max_length=distill.get("max_seq_length", 512))
    lora = raw.get("lora", {})
    peft_config = None
    if lora.get("enable"):
        peft_config = LoraConfig(
            r=lora.get("r", 8),
            lora_alpha=lora.get("alpha", 16),
            lora_dropout=lora.get("dropout", 0.05),
            target_modules=lora.get("target_modules", "all-linear"),
            task_type="CAUSAL_LM",
        )
    if args.sft:
        from trl import SFTConfig, SFTTrainer

        trainer = SFTTrainer(
            model=models["student"],
            args=SFTConfig(**common),
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
        )
    else:
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        teacher = models["teacher"]
        teacher = models["student"] if teacher == "self" else teacher
        config = GKDConfig(
            **common,
            lmbda=0.0,
            seq_kd=False,
            beta=distill.get("beta", 0.5),
            temperature=distill.get("temperature", 1.0),
        )
        trainer = GKDTrainer(
            model=models["student"],
            teacher_model=teacher,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
        )
    trainer.train()
    trainer.save_model(training["output_dir"])
    trainer.save_state()


if __name__ == "__main__":
    main()
