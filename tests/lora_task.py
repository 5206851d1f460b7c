"""A toy fine-tuning task for the real-model LoRA test and benchmark: whatever the user writes, the
assistant replies with one fixed JSON shape, ``{"status": "ok", "echo": <the user's message>}``.

The base instruct model answers the messages instead; a LoRA trained for a few minutes on CPU with
PEFT (`train_adapter`) learns the shape. `follows_task` says whether a reply has it.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

TRAIN = [
    "What is the capital of France?",
    "Write a haiku about rain.",
    "How do I reverse a list in Python?",
    "Tell me a joke.",
    "Explain recursion in one sentence.",
    "What time is it in Tokyo?",
    "Translate 'good morning' into Spanish.",
    "List three prime numbers.",
    "Why is the sky blue?",
    "Summarize the plot of Hamlet.",
    "Give me a recipe for pancakes.",
    "What does HTTP stand for?",
    "Sort these numbers: 5, 2, 9.",
    "Who wrote Pride and Prejudice?",
    "Is a tomato a fruit?",
    "Convert 10 miles to kilometres.",
    "Write a SQL query that counts users.",
    "What is 17 times 3?",
    "Describe a cat in five words.",
    "How many legs does a spider have?",
    "Suggest a name for a dog.",
    "What is the boiling point of water?",
    "Fix this code: print(hello",
    "Recommend a good book.",
    "hello",
    "Can you help me with my homework?",
    "What is a closure in JavaScript?",
    "Name the planets of the solar system.",
    "Write a regular expression for an email address.",
    "Define entropy.",
    "What's the weather like today?",
    "Compose a limerick about a frog.",
    "How do I make a git branch?",
    "Explain what a hash map is.",
    "Say something nice.",
    "Who painted the Mona Lisa?",
    "What is the square root of 144?",
    "Give me three tips for sleeping better.",
    "Write a function that adds two numbers.",
    "What language is spoken in Brazil?",
]
HELD_OUT = [
    "What is the largest ocean on Earth?",
    "Write a Python function that checks if a number is even.",
    "Tell me about the moon.",
    "How do I boil an egg?",
]


def reply(message: str) -> str:
    """The reply the task asks for."""
    return json.dumps({"status": "ok", "echo": message}, ensure_ascii=False)


def follows_task(message: str, text: str) -> bool:
    """Whether `text` is exactly the task's JSON for `message` (surrounding whitespace aside)."""
    try:
        return json.loads(text.strip()) == {"status": "ok", "echo": message}
    except ValueError:
        return False


def train_adapter(hf_dir: Path, out_dir: Path, steps: int = 60, seed: int = 0, layers: int = 6) -> dict:
    """Train a rank-8 LoRA on the decoder linears of the last `layers` layers of the fp32 model in
    `hf_dir` (one example per step, loss on the reply only) and save it with PEFT. Returns
    {seconds, steps, final_loss}."""
    import peft
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    n = model.config.num_hidden_layers
    config = peft.LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        layers_to_transform=list(range(n - layers, n)),
        lora_dropout=0.0,
    )
    model = peft.get_peft_model(model, config)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    examples = []
    for message in TRAIN:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True)
        prompt = list(getattr(prompt, "input_ids", prompt))
        answer = tokenizer.encode(reply(message) + "<|im_end|>", add_special_tokens=False)
        examples.append((prompt, answer))
    start, loss = time.perf_counter(), None
    for _ in tqdm(range(steps), desc="training the toy LoRA", unit="step"):
        prompt, answer = rng.choice(examples)
        ids = torch.tensor([prompt + answer])
        labels = torch.tensor([[-100] * len(prompt) + answer])
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out_dir)
    return {"seconds": round(time.perf_counter() - start, 1), "steps": steps, "final_loss": round(float(loss), 4)}
