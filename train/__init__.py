"""Stage 1: QLoRA supervised fine-tuning -> OUTPUT_DIR/adapter/ (PEFT adapter, tokenizer, card, manifest).

settings.py (every knob, from the environment), data.py (rows -> masked token ids),
model.py (base loading, 4-bit, LoRA), run.py (the training story), card.py (card, summary, plot).
"""
