# Writes the transformers-side fixture that semoe's tests compare against: a small random
# MixtralForCausalLM saved by save_pretrained (sharded, with model.safetensors.index.json),
# and its fp32 logits, loss and aux loss on a fixed byte-level text. Needs torch and
# transformers (the GPU machine has both); run once, commit the output folder.
#   python3 tests/hf/make_fixture.py tests/fixtures/tiny_mixtral
import json, os, sys

import torch
import transformers
from transformers import MixtralConfig, MixtralForCausalLM

out = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/tiny_mixtral"
os.makedirs(out, exist_ok=True)
torch.manual_seed(1234)
cfg = MixtralConfig(
    vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
    max_position_embeddings=128, rope_theta=10000.0, rms_norm_eps=1e-5,
    router_aux_loss_coef=0.02, tie_word_embeddings=False, output_router_logits=True,
    attn_implementation="eager", torch_dtype="float32")
model = MixtralForCausalLM(cfg).float().eval()
# Weights well away from zero, norms away from one, so that every tensor matters.
with torch.no_grad():
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.2 * torch.randn_like(p))
        else:
            p.copy_(0.15 * torch.randn_like(p))
model.save_pretrained(out, max_shard_size="200KB", safe_serialization=True)

text = b"The quick brown fox jumps over the lazy dog; experts route bytes."
ids = torch.tensor([list(text)], dtype=torch.long)
with torch.no_grad():
    res = model(input_ids=ids, labels=ids, output_router_logits=True)
logits = res.logits[0].float().contiguous()
logits.numpy().astype("<f4").tofile(os.path.join(out, "logits.f32"))
# The loss transformers reports with labels includes coef * aux; keep the parts apart.
ce = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:]).item()
meta = {
    "transformers": transformers.__version__, "torch": torch.__version__,
    "text": text.decode(), "tokens": list(text), "logits_shape": list(logits.shape),
    "loss_with_aux": res.loss.item(), "cross_entropy": ce, "aux_loss": res.aux_loss.item(),
    "router_aux_loss_coef": cfg.router_aux_loss_coef,
}
with open(os.path.join(out, "fixture.json"), "w") as f:
    json.dump(meta, f, indent=1)
print(json.dumps(meta)[:400])
print(sorted(os.listdir(out)))
