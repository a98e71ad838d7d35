# Loads a checkpoint that semoe wrote (`build/tests/test_hf_fixture --write-ours DIR`) with
# transformers' MixtralForCausalLM.from_pretrained and compares its fp32 logits on the fixture
# text with the logits semoe computed (DIR/our_logits.f32). Exit 1 when norm-wise > 1e-5.
#   python3 tests/hf/check_ours.py DIR tests/fixtures/tiny_mixtral/fixture.json
import json, sys

import numpy as np
import torch
from transformers import MixtralForCausalLM

d, fixture = sys.argv[1], sys.argv[2]
tokens = json.load(open(fixture))["tokens"]
model = MixtralForCausalLM.from_pretrained(d, torch_dtype=torch.float32,
                                           attn_implementation="eager").eval()
with torch.no_grad():
    theirs = model(input_ids=torch.tensor([tokens])).logits[0].double().numpy()
ours = np.fromfile(f"{d}/our_logits.f32", dtype="<f4").reshape(theirs.shape).astype(np.float64)
err = np.linalg.norm(ours - theirs) / np.linalg.norm(theirs)
print(f"semoe checkpoint in transformers: logits norm-wise relative error {err:.3g} "
      f"over {theirs.shape}")
sys.exit(0 if err < 1e-5 else 1)
