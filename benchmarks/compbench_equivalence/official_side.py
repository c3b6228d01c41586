"""T2I-CompBench's own scorers, run on random weights: the reference side of the equivalence check.

Runs in a separate venv (the official BLIP code needs transformers 4.x): see README.md here.
The official code is used as fetched (third_party/T2I-CompBench, never committed); what this
script changes is listed in ``shim`` and nothing else:

- ``spacy``: a stand-in module whose ``noun_chunks`` are mitune's rule chunker's (en_core_web_sm
  is not installable here), so both sides ask the same questions;
- ``cuda`` -> ``cpu`` in ``Tensor.to`` / ``Module.to`` (their scripts hard-code ``cuda``);
- ``BertTokenizer.from_pretrained("bert-base-uncased")`` -> the fixture vocabulary, the
  checkpoint download -> a local file of random weights, ``clip.load`` -> a random ViT-B/32;
- ``fairscale``'s ``checkpoint_wrapper`` (only used for gradient checkpointing) and ``cv2`` (only
  their training augmentations): stubs.

Writes into OUT: the random weights (safetensors, original key names), per-stage records of
the official pipelines (JSON + safetensors) for ``mitune_side.py`` to compare against.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import math
import os
import shutil
import sys
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
OFFICIAL = ROOT / "third_party" / "T2I-CompBench"
BLIP_DIR = OFFICIAL / "BLIPvqa_eval"
sys.path.insert(0, str(HERE))

import fixtures
import torch
from safetensors.torch import save_file

torch.set_num_threads(2)


def load_rule_chunker():
    """mitune's rule chunker, by file path: pure Python, no mitune imports."""
    spec = importlib.util.spec_from_file_location("mitune_phrases", ROOT / "mitune" / "prompts" / "phrases.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.rule_noun_chunks


def stub(name: str) -> types.ModuleType:
    """An importable empty module (with a spec, so ``find_spec`` probes do not fail)."""
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    sys.modules[name] = module
    return module


def install_spacy_shim() -> None:
    chunker = load_rule_chunker()

    class Span:
        def __init__(self, text):
            self.text = text

    class Doc:
        def __init__(self, text):
            self.noun_chunks = [Span(c) for c in chunker(text)]

        def __iter__(self):
            raise RuntimeError("POS tags are not available in the equivalence check")

    stub("spacy").load = lambda name: Doc


def install_device_shim() -> None:
    def cpu(device):
        return "cpu" if str(device).startswith("cuda") else device

    tensor_to, module_to = torch.Tensor.to, torch.nn.Module.to

    def tensor_to_cpu(self, *args, **kwargs):
        args = tuple(cpu(a) if isinstance(a, (str, torch.device)) else a for a in args)
        if "device" in kwargs:
            kwargs["device"] = cpu(kwargs["device"])
        return tensor_to(self, *args, **kwargs)

    def module_to_cpu(self, *args, **kwargs):
        args = tuple(cpu(a) if isinstance(a, (str, torch.device)) else a for a in args)
        return module_to(self, *args, **kwargs)

    torch.Tensor.to = tensor_to_cpu
    torch.nn.Module.to = module_to_cpu


def install_fairscale_stub() -> None:
    names = ["fairscale", "fairscale.nn", "fairscale.nn.checkpoint", "fairscale.nn.checkpoint.checkpoint_activations"]
    for name in names:
        stub(name)
    sys.modules[names[-1]].checkpoint_wrapper = lambda module, **kwargs: module
    stub("cv2")  # only their training augmentations use OpenCV


def write_vocab(out: Path, texts: list[str]) -> Path:
    folder = out / "bert-vocab"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(fixtures.vocab(texts)) + "\n")
    return folder


def smooth_pos_embed(n_side: int, dim: int) -> torch.Tensor:
    """2D sin-cos position embeddings (std ~0.02 like a trained ViT's scale), CLS row zero.

    Random-init position embeddings are white noise, which no interpolation preserves; trained
    ones vary smoothly over the grid. This stands in for the latter in the 384-vs-480 question.
    """
    y, x = torch.meshgrid(torch.arange(n_side, dtype=torch.float64), torch.arange(n_side, dtype=torch.float64),
                          indexing="ij")
    quarter = dim // 4
    freq = 1.0 / (100 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    parts = [torch.sin(x.reshape(-1, 1) * freq), torch.cos(x.reshape(-1, 1) * freq),
             torch.sin(y.reshape(-1, 1) * freq), torch.cos(y.reshape(-1, 1) * freq)]
    grid = torch.cat(parts, dim=1) * 0.02 * math.sqrt(2)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), grid]).unsqueeze(0).float()


def write_samples(folder: Path, prompts: list[str], per_prompt: int, seed: int) -> list[tuple[str, int]]:
    """T2I-CompBench's layout: samples/<prompt>_<index:06d>.png, the index running over all images."""
    folder.mkdir(parents=True, exist_ok=True)
    pictures = fixtures.images(len(prompts) * per_prompt, seed=seed)
    rows = []
    for i, prompt in enumerate(prompts):
        for k in range(per_prompt):
            index = i * per_prompt + k
            pictures[index].save(folder / f"{prompt}_{index:06d}.png")
            rows.append((prompt, index))
    return rows


# ----------------------------------------------------------------------------- BLIP-VQA


def blip(out: Path, texts: list[str], prompts: list[str]) -> None:
    from transformers import BertTokenizer

    vocab_dir = write_vocab(out, texts)
    original = BertTokenizer.from_pretrained.__func__

    def from_pretrained(cls, name, *args, **kwargs):
        return original(cls, str(vocab_dir) if name == "bert-base-uncased" else name, *args, **kwargs)

    BertTokenizer.from_pretrained = classmethod(from_pretrained)

    os.chdir(BLIP_DIR)  # their configs are relative paths
    sys.path.insert(0, str(BLIP_DIR))
    import models.blip as blip_module
    from models.blip_vqa import BLIP_VQA, blip_vqa

    torch.manual_seed(0)
    model = blip_vqa(image_size=480, vit="base")
    with torch.no_grad():
        model.visual_encoder.pos_embed.copy_(smooth_pos_embed(30, 768))
    weights_480 = out / "blip_official_480.pth"
    torch.save({"model": model.state_dict()}, weights_480)
    save_file({k: v.clone().contiguous() for k, v in model.state_dict().items()}, out / "blip_official_480.safetensors")
    # What transformers' conversion did: the 480-px checkpoint loaded at 384 (pos_embed interpolated).
    at_384 = blip_vqa(pretrained=str(weights_480), image_size=384, vit="base")
    save_file({k: v.clone().contiguous() for k, v in at_384.state_dict().items()}, out / "blip_official_384.safetensors")
    blip_module.download_cached_file = lambda url, **kwargs: str(weights_480)

    records: dict = {"pixels": [], "questions": []}
    forward = BLIP_VQA.forward

    def recording_forward(self, image, question, *args, **kwargs):
        records["pixels"].append(image.clone())
        encoder_forward = self.text_encoder.forward

        def encoder(input_ids, attention_mask=None, **kw):
            records["questions"].append({"texts": list(question), "ids": input_ids.tolist(),
                                         "mask": attention_mask.tolist()})
            return encoder_forward(input_ids, attention_mask=attention_mask, **kw)

        self.text_encoder.forward = encoder
        try:
            return forward(self, image, question, *args, **kwargs)
        finally:
            del self.text_encoder.forward

    vqa_prob = BLIP_VQA.vqa_prob

    def recording_vqa_prob(self, *args, **kwargs):
        probs = vqa_prob(self, *args, **kwargs)
        records["questions"][-1]["p_yes"] = probs.tolist()
        return probs

    BLIP_VQA.forward, BLIP_VQA.vqa_prob = recording_forward, recording_vqa_prob

    run = out / "blip_run"
    shutil.rmtree(run, ignore_errors=True)
    rows = write_samples(run / "samples", prompts, fixtures.IMAGES_PER_PROMPT, seed=1)
    import BLIP_vqa as entry

    sys.argv = ["BLIP_vqa.py", f"--out_dir={run}/"]
    entry.main()

    per_pass = len(rows)
    pixels = torch.cat(records["pixels"][: math.ceil(per_pass / 32)])
    save_file({"pixels": pixels.contiguous()}, out / "blip_official_pixels.safetensors")
    final = json.loads((run / "annotation_blip" / "vqa_result.json").read_text())
    passes = []
    for np_index in range(8):
        answers = json.loads((run / f"annotation{np_index + 1}_blip" / "VQA" / "result" / "vqa_result.json").read_text())
        asked = json.loads((run / f"annotation{np_index + 1}_blip" / "vqa_test.json").read_text())
        passes.append({"answers": answers, "asked": asked})
    (out / "blip_official.json").write_text(json.dumps({
        "samples": [{"prompt": p, "index": i} for p, i in rows],
        "batches": records["questions"],
        "passes": passes,
        "final": final,
    }))
    print(f"BLIP-VQA: {len(rows)} images, {sum(len(b['texts']) for b in records['questions'])} questions")


# ----------------------------------------------------------------------------- CLIP


def clip(out: Path, prompts: list[str]) -> None:
    sys.path.insert(0, str(OFFICIAL / "CLIPScore_eval"))
    import clip as clip_package
    from clip.clip import _transform
    from clip.model import CLIP

    torch.manual_seed(0)
    model = CLIP(512, 224, 12, 768, 32, 77, 49408, 512, 8, 12).eval()
    save_file({k: v.clone().contiguous() for k, v in model.state_dict().items()}, out / "clip_official.safetensors")

    run = out / "clip_run"
    shutil.rmtree(run, ignore_errors=True)
    rows = write_samples(run / "samples", prompts, fixtures.IMAGES_PER_PROMPT, seed=2)
    records = {"pixels": [], "ids": []}
    encode_image, encode_text = CLIP.encode_image, CLIP.encode_text
    CLIP.encode_image = lambda self, image: records["pixels"].append(image.clone()) or encode_image(self, image)
    CLIP.encode_text = lambda self, text: records["ids"].append(text[0].tolist()) or encode_text(self, text)
    results = {}
    for precision in ("fp32", "fp16"):
        # On a GPU clip.load keeps the fp16 weights of OpenAI's checkpoint; on a CPU it casts to fp32.
        used = model if precision == "fp32" else CLIP(512, 224, 12, 768, 32, 77, 49408, 512, 8, 12).eval()
        if precision == "fp16":
            used.load_state_dict(model.state_dict())
            clip_package.model.convert_weights(used)
        clip_package.load = lambda name, device=None, used=used: (used, _transform(224))
        sys.modules.pop("CLIP_similarity", None)
        import CLIP_similarity

        sys.argv = ["CLIP_similarity.py", f"--outpath={run}"]
        CLIP_similarity.main()
        results[precision] = json.loads((run / "annotation_clip" / "vqa_result.json").read_text())
    n = len(rows)
    save_file({"pixels": torch.cat(records["pixels"][:n]).contiguous()}, out / "clip_official_pixels.safetensors")
    (out / "clip_official.json").write_text(json.dumps({
        "samples": [{"prompt": p, "index": i} for p, i in rows], "ids": records["ids"][:n], **results}))
    print(f"CLIP: {n} images")


# ----------------------------------------------------------------------------- 3-in-1


def three_in_one(out: Path, prompts: list[str]) -> None:
    """Their combination script on made-up part scores (10 images per prompt, as it assumes)."""
    run = out / "three_run"
    shutil.rmtree(run, ignore_errors=True)
    data = run / "dataset"
    data.mkdir(parents=True)
    (data / "complex_val.txt").write_text("\n".join(prompts) + "\n")
    (data / "complex_val_spatial.txt").write_text(prompts[0] + "\n")
    (data / "complex_val_action.txt").write_text(prompts[1] + "\n")
    generator = torch.Generator().manual_seed(3)
    parts = {name: torch.rand(len(prompts) * 10, generator=generator, dtype=torch.float64).tolist()
             for name in ("attribute", "spatial", "action")}
    for name, folder in (("attribute", "annotation_blip"), ("spatial", "labels/annotation_obj_detection_2d"),
                         ("action", "annotation_clip")):
        (run / folder).mkdir(parents=True, exist_ok=True)
        rows = [{"question_id": i, "answer": f"{v:.4f}" if name == "attribute" else v} for i, v in enumerate(parts[name])]
        (run / folder / "vqa_result.json").write_text(json.dumps(rows))
    spec = importlib.util.spec_from_file_location("three_in_one", OFFICIAL / "3_in_1_eval" / "3_in_1.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.argv = ["3_in_1.py", f"--outpath={run}", f"--data_path={data}"]
    module.main()
    result = json.loads((run / "annotation_3_in_1" / "vqa_result.json").read_text())
    (out / "three_official.json").write_text(json.dumps({
        "prompts": prompts, "spatial_list": [prompts[0]], "action_list": [prompts[1]],
        "parts": {k: [float(f"{v:.4f}") if k == "attribute" else v for v in vals] for k, vals in parts.items()},
        "result": [r["answer"] for r in result]}))
    print(f"3-in-1: {len(result)} images")


def main() -> None:
    out = Path(sys.argv[1]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    install_spacy_shim()
    install_device_shim()
    install_fairscale_stub()
    chosen = fixtures.prompts()
    blip_prompts = chosen["color"] + chosen["shape"] + chosen["texture"] + chosen["complex"]
    texts = [p for group in chosen.values() for p in group]
    parts = sys.argv[2:] or ["three_in_one", "clip", "blip"]
    if "three_in_one" in parts:
        three_in_one(out, chosen["complex"])
    if "clip" in parts:
        clip(out, chosen["non_spatial"])
    if "blip" in parts:
        blip(out, texts, blip_prompts)


if __name__ == "__main__":
    main()
