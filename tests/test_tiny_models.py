from dresd.models import load_model, model_fingerprint


def test_tiny_models_load_from_disk_and_fingerprint_differs(tiny_model_dirs):
    prints = set()
    for path in tiny_model_dirs.values():
        model, tok = load_model(path, device="cpu")
        assert model.config.vocab_size == len(tok)
        ids = tok.apply_chat_template([{"role": "user", "content": "def f(x):"}],
                                      add_generation_prompt=True, return_dict=False)
        assert len(ids) > 3
        prints.add(model_fingerprint(model, tok))
    assert len(prints) == 3


def test_models_load_in_float32_on_every_device_unless_asked(tiny_llama_dir):
    import pytest
    import torch

    from dresd.models import pick_dtype

    # float32 on CUDA too: bfloat16 tree verification can break greedy ties differently
    assert pick_dtype() == pick_dtype("") == torch.float32  # takes no device: none matters
    assert pick_dtype("bfloat16") == torch.bfloat16
    for bad in ("float33", "int8", "Tensor"):
        with pytest.raises(ValueError, match=f"unknown floating-point torch dtype '{bad}'"):
            pick_dtype(bad)
    assert load_model(tiny_llama_dir)[0].dtype == torch.float32
    assert load_model(tiny_llama_dir, dtype="bfloat16")[0].dtype == torch.bfloat16
