"""Tiny pipelines, tokenizer, loading errors and conditioning helpers of ``mitune.models``."""

import socket
from pathlib import Path

import pytest
import torch
from diffusers import (
    DDPMScheduler,
    DiffusionPipeline,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from safetensors.torch import load_file

from mitune.mi.pipeline import (
    ddpm_scheduler,
    encode_prompts,
    index_embedding,
    latent_shape,
    null_embedding,
    unet_eps_fn,
    v_to_eps,
)
from mitune.models.builders import BOS, EOS, TINY_MAX_LENGTH, UNK, build_tiny_pipeline, tiny_tokenizer, tiny_vocab
from mitune.models.loading import load_pipeline
from mitune.models.weights import ModelLoadError

PIPELINE_CLASSES = {"sd": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}


@pytest.fixture(params=["sd", "sdxl"])
def kind_and_path(request):
    return request.param, request.getfixturevalue(f"tiny_{request.param}_path")


@pytest.fixture(scope="module")
def sd(tiny_sd_path):
    return load_pipeline(str(tiny_sd_path))


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_path):
    return load_pipeline(str(tiny_sdxl_path))


@pytest.fixture
def no_network(monkeypatch):
    """Fail loudly if anything tries to open a connection."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def weight_files(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {str(f.relative_to(path)): load_file(f) for f in sorted(path.rglob("*.safetensors"))}


# ----------------------------------------------------------------------------- building and loading


def test_tiny_pipeline_is_saved_in_diffusers_format_with_safetensors_only(kind_and_path):
    _, path = kind_and_path
    assert (path / "model_index.json").is_file()
    files = [f.name for f in path.rglob("*") if f.is_file()]
    assert not [f for f in files if f.endswith((".bin", ".pkl", ".pt", ".ckpt"))]
    components = {f.parent.name for f in path.rglob("*.safetensors")}
    assert {"unet", "vae", "text_encoder"} <= components


def test_tiny_pipeline_reloads_offline_with_from_pretrained_and_load_pipeline(kind_and_path, no_network):
    kind, path = kind_and_path
    assert type(DiffusionPipeline.from_pretrained(path)) is PIPELINE_CLASSES[kind]
    pipe = load_pipeline(str(path))
    assert type(pipe) is PIPELINE_CLASSES[kind]
    assert isinstance(pipe.scheduler, DDPMScheduler)
    assert pipe.scheduler.config.variance_type == "fixed_large"
    assert getattr(pipe, "safety_checker", None) is None
    assert pipe.tokenizer.model_max_length == TINY_MAX_LENGTH


def test_same_seed_builds_identical_weights_and_another_seed_does_not(tiny_sd_path, tmp_path):
    again = weight_files(build_tiny_pipeline(tmp_path / "again", kind="sd", seed=0))
    first = weight_files(tiny_sd_path)
    assert again.keys() == first.keys()
    for name, tensors in first.items():
        assert all(torch.equal(tensors[key], again[name][key]) for key in tensors), name
    other = weight_files(build_tiny_pipeline(tmp_path / "other", kind="sd", seed=1))
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert not torch.equal(other[unet]["conv_in.weight"], first[unet]["conv_in.weight"])


def test_build_rejects_unknown_kind_and_bad_size(tmp_path):
    with pytest.raises(ValueError, match="'sd3'"):
        build_tiny_pipeline(tmp_path, kind="sd3")
    with pytest.raises(ValueError, match="multiple of 8"):
        build_tiny_pipeline(tmp_path, image_size=20)


def test_missing_local_path_names_the_path(no_network):
    for path in ["/no/such/model", "./no-such-model", "~/no-such-model", "no/such/model"]:
        with pytest.raises(FileNotFoundError, match=f"model path '{path}' does not exist"):
            load_pipeline(path)


def test_directory_without_model_index_is_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_pipeline(str(tmp_path))


@pytest.mark.parametrize("hub_id", ["no-such-org/no-such-model", "no-such-model"])
def test_unreachable_hub_id_fails_fast_without_network(hub_id, no_network):
    with pytest.raises(ModelLoadError, match=f"model '{hub_id}' is not a local folder, not in the Hugging Face cache") as info:
        load_pipeline(hub_id)
    assert isinstance(info.value, OSError)
    message = str(info.value)
    assert "\n" not in message and "offline mode is enabled" in message
    assert f"`hf download {hub_id}`" in message and "pass a local diffusers folder" in message


def test_ddpm_scheduler_from_a_pipeline_that_shipped_pndm(tiny_sd_path, tmp_path):
    pipe = load_pipeline(str(tiny_sd_path))
    # SD-2.1-base ships a PNDMScheduler with PNDM-only config keys.
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True, set_alpha_to_one=False)
    pipe.save_pretrained(tmp_path, safe_serialization=True)
    reloaded = load_pipeline(str(tmp_path))
    assert isinstance(reloaded.scheduler, PNDMScheduler)
    ddpm = ddpm_scheduler(reloaded)
    assert type(ddpm) is DDPMScheduler
    assert ddpm.config.variance_type == "fixed_large"
    assert ddpm.config.clip_sample is False
    assert ddpm.config.prediction_type == "epsilon"
    assert ddpm.config.num_train_timesteps == 1000
    assert torch.equal(ddpm.alphas_cumprod, reloaded.scheduler.alphas_cumprod)
    assert ddpm_scheduler(reloaded, variance_type="fixed_small").config.variance_type == "fixed_small"


def test_unsupported_prediction_type_is_rejected_on_load(tiny_sd_path, tmp_path):
    pipe = load_pipeline(str(tiny_sd_path))
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config, prediction_type="sample")
    pipe.save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(ValueError, match="prediction_type 'sample' is not supported"):
        load_pipeline(str(tmp_path))


# ----------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(tiny_vocab(), TINY_MAX_LENGTH)


def encode(tok, prompts):
    return tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")


def test_vocab_covers_compbench_style_prompts(tok):
    words = "a green bench and a blue bowl , a cat on the left of a dog .".split()
    assert all(word in tok.get_vocab() for word in words)
    assert 250 <= len(tiny_vocab()) == len(set(tiny_vocab()))


def test_known_words_map_to_their_ids_between_bos_and_eos(tok):
    ids = encode(tok, ["A Cat on the left of a dog."]).input_ids[0].tolist()
    vocab = tok.get_vocab()
    words = [BOS, "a", "cat", "on", "the", "left", "of", "a", "dog", ".", EOS]
    assert ids[: len(words)] == [vocab[w] for w in words]
    assert ids[len(words):] == [tok.pad_token_id] * (TINY_MAX_LENGTH - len(words))
    assert tok.pad_token_id == tok.eos_token_id == max(vocab.values())


def test_unknown_words_map_to_unk(tok):
    ids = encode(tok, ["a zorblax cat"]).input_ids[0].tolist()
    assert ids[2] == tok.convert_tokens_to_ids(UNK) == tok.unk_token_id


def test_long_prompts_truncate_to_max_length_ending_in_eos(tok):
    ids = encode(tok, [" ".join(["red cat"] * 20), "a dog"]).input_ids
    assert ids.shape == (2, TINY_MAX_LENGTH)
    assert ids[0, 0] == tok.bos_token_id and ids[0, -1] == tok.eos_token_id
    assert (ids[0, 1:-1] != tok.eos_token_id).all()


# ----------------------------------------------------------------------------- conditioning


def test_sd_embeddings_have_the_unet_shape(sd):
    emb = encode_prompts(sd, ["a red cube", "a blue ball on the table"])
    assert emb.shape == (2, TINY_MAX_LENGTH, sd.unet.config.cross_attention_dim)
    null = null_embedding(sd, batch_size=3)
    assert null.shape == (3, TINY_MAX_LENGTH, sd.unet.config.cross_attention_dim)
    torch.testing.assert_close(null[0], encode_prompts(sd, [""])[0], rtol=0, atol=1e-6)
    assert not torch.allclose(emb[0], null[0])


def test_sdxl_embeddings_carry_pooled_text_and_default_size_ids(sdxl):
    emb = encode_prompts(sdxl, ["a red cube", "a blue ball"])
    assert emb["encoder_hidden_states"].shape == (2, TINY_MAX_LENGTH, sdxl.unet.config.cross_attention_dim)
    assert emb["text_embeds"].shape == (2, sdxl.text_encoder_2.config.projection_dim)
    assert emb["time_ids"].tolist() == [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 2


def test_sdxl_null_embedding_is_zeroed_like_the_pipeline(sdxl):
    null = null_embedding(sdxl, batch_size=2)
    assert not null["encoder_hidden_states"].any() and not null["text_embeds"].any()
    assert torch.equal(null["time_ids"], encode_prompts(sdxl, ["a cat", "a dog"])["time_ids"])


def test_index_embedding_works_on_tensors_and_dicts(sd, sdxl):
    for emb in (encode_prompts(sd, ["a", "b", "c"]), encode_prompts(sdxl, ["a", "b", "c"])):
        rows = (lambda e: e) if isinstance(emb, torch.Tensor) else (lambda e: e["encoder_hidden_states"])
        picked = index_embedding(emb, torch.tensor([2, 0]))
        assert torch.equal(rows(picked), rows(emb)[[2, 0]])


def test_latent_shape_matches_the_unet_and_vae(sd, sdxl):
    assert latent_shape(sd, 5) == (5, 4, 16, 16)
    assert latent_shape(sdxl, 1) == (1, 4, 16, 16)


def test_eps_fn_returns_eps_of_the_latent_shape(sd):
    z = torch.randn(latent_shape(sd, 2))
    eps = unet_eps_fn(sd)(z, torch.tensor([999, 10]), encode_prompts(sd, ["a cat", "a dog"]))
    assert eps.shape == z.shape and eps.dtype == sd.unet.dtype


def test_v_to_eps_inverts_the_v_parameterisation():
    x0, eps = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    alphabar = torch.tensor([0.9, 0.05])
    a = alphabar.view(-1, 1, 1, 1)
    z_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    torch.testing.assert_close(v_to_eps(v, z_t, alphabar), eps)
