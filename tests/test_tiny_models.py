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


def test_models_load_concurrently_from_threads(tiny_model_dirs):
    """Beam runs DoFn setups in worker threads. transformers swaps process-wide hooks while it
    builds a model, so unserialised loads in two threads can leave a model's tied output
    embedding on the meta device (without dresd.models' lock, about a third of these loads
    failed with "Cannot copy out of meta tensor")."""
    import threading

    import torch

    errors, models = [], []

    def load(path):
        for _ in range(5):
            try:
                models.append(load_model(path, device="cpu")[0])
            except Exception as e:  # noqa: BLE001 - collected and asserted below
                errors.append(repr(e))

    threads = [threading.Thread(target=load, args=(p,)) for p in list(tiny_model_dirs.values()) * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(models) == 30
    assert not any(p.device == torch.device("meta") for m in models for p in m.parameters())
