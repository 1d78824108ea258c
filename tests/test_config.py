import pytest

from study.config import Config, ConfigError, config_from_dict, config_to_dict, load_config, save_config


def test_defaults_are_valid():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.num_patches == 16


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("objective: cimle\nmask:\n  kind: block\n  ratio: 0.9\ncimle:\n  k: 4\n")
    cfg = load_config(path, ["cimle.k=2", "optim.clip_grad=1.0", "mask.kind=noise", "cimle.chunk=null"])
    assert cfg.objective == "cimle"
    assert cfg.cimle.k == 2
    assert cfg.mask.kind == "noise" and cfg.mask.ratio == 0.9
    assert cfg.optim.clip_grad == 1.0 and cfg.cimle.chunk is None


def test_round_trip(tmp_path):
    cfg = load_config(None, ["objective=mvae", "mvae.beta=0.5"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "override, field",
    [
        ("mask.ratio=1.5", "mask.ratio"),
        ("mask.ratio=0", "mask.ratio"),
        ("mask.ratio=1.0", "mask.ratio"),
        ("cimle.k=0", "cimle.k"),
        ("cimle.k=2.5", "cimle.k"),
        ("model.img_size=30", "model.img_size"),
        ("objective=mse", "objective"),
        ("mask.kind=checker", "mask.kind"),
        ("epochs=0", "epochs"),
        ("noise.block=5", "noise.block"),
        ("data.name=imagenet100", "data.root"),
        ("optim.batch_size=true", "optim.batch_size"),
        ("mask.ratio=0.99", "mask.ratio"),  # 16 patches: masks all of them
    ],
)
def test_invalid_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, [override])


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match="ratoi"):
        load_config(None, ["mask.ratoi=0.5"])
    path = tmp_path / "bad.yaml"
    path.write_text("[1, 2]\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


def test_missing_file_and_bad_override():
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/config.yaml")
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["objective"])


def test_shipped_configs_load():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[1] / "experiments" / "configs").glob("*.yaml"))
    assert {p.stem for p in configs} >= {"cpu-small", "synthetic", "in100-vit-t", "in1k-vit-b"}
    for path in configs:
        load_config(path)


def test_list_fields():
    assert load_config(None, ["epochs=10", "snapshot_epochs=[2, 5]"]).snapshot_epochs == [2, 5]
    with pytest.raises(ConfigError, match="snapshot_epochs"):
        load_config(None, ["epochs=10", "snapshot_epochs=[20]"])
    with pytest.raises(ConfigError, match=r"snapshot_epochs\[0\]"):
        load_config(None, ["snapshot_epochs=[a]"])


def test_exponent_without_dot_is_a_number_and_words_are_not():
    # YAML 1.1 reads "4e-3" as a string; users write it that way on the command line
    assert load_config(None, ["optim.blr=4e-3"]).optim.blr == pytest.approx(4e-3)
    with pytest.raises(ConfigError, match="optim.blr"):
        load_config(None, ["optim.blr=fast"])


def test_token_selection_refuses_inexact_noise():
    ok = ["objective=cimle", "cimle.select=token", "noise.scope=token"]
    assert load_config(None, ok + ["noise.block=head"]).noise.block == "head"
    assert load_config(None, ok + ["noise.block=1"]).noise.block == 1  # decoder_depth 1: after the last attention
    with pytest.raises(ConfigError, match=r"cimle\.select.*noise\.block"):
        load_config(None, ok + ["noise.block=0", "model.decoder_depth=1"])  # before the attention: inexact
    with pytest.raises(ConfigError, match=r"cimle\.select.*noise\.scope"):
        load_config(None, ["objective=cimle", "cimle.select=token", "noise.block=head"])
    with pytest.raises(ConfigError, match=r"cimle\.select"):
        load_config(None, ["cimle.select=patch"])
    with pytest.raises(ConfigError, match=r"noise\.block"):
        load_config(None, ["noise.block=tail"])


def test_a_synthetic_setting_is_named_with_its_section():
    with pytest.raises(ConfigError, match="data.synthetic.cue"):
        load_config(None, ["data.synthetic.cue=0"])
    with pytest.raises(ConfigError, match="unknown key.*data.synthetic"):
        load_config(None, ["data.synthetic.kind=hidden"])


@pytest.mark.parametrize("text", ["", "\n", "# nothing here yet\n", "# a\n\n# b\n", "~\n"])
def test_empty_or_comment_only_file_is_refused(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"empty\.yaml.*empty.*--config"):
        load_config(path)
    path.write_text("{}\n")  # an explicit empty mapping asks for the defaults
    assert load_config(path) == load_config()


@pytest.mark.parametrize("text, field", [
    ("epochs: 3\nseed: 1\nepochs: 4\n", r"epochs is given twice \(lines 1 and 3\)"),
    ("mask:\n  ratio: 0.5\n  kind: block\n  ratio: 0.6\n", r"mask\.ratio is given twice \(lines 2 and 4\)"),
    ("data:\n  synthetic:\n    cue: 1.0\n    cue: 2.0\n", r"data\.synthetic\.cue"),
    ("mask: {ratio: 0.5, ratio: 0.6}\n", r"mask\.ratio"),
])
def test_duplicated_key_is_refused(tmp_path, text, field):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"dup\.yaml.*{field}.*keep one"):
        load_config(path)


def test_duplicated_key_in_an_override_is_refused():
    with pytest.raises(ConfigError, match=r"--set mask=.*ratio.*twice"):
        load_config(None, ["mask={ratio: 0.5, ratio: 0.6}"])


def test_seed_must_fit_32_bits():
    assert load_config(None, [f"seed={2**32 - 1}"]).seed == 2**32 - 1
    for seed in (-1, 2**32, 10**30):
        with pytest.raises(ConfigError, match=r"^seed .*\[0, 4294967295\]"):
            load_config(None, [f"seed={seed}"])


@pytest.mark.parametrize("override", ["optim.blr=inf", "optim.blr=.inf", "optim.blr=nan", "optim.blr=.nan",
                                      "optim.min_lr=inf", "optim.weight_decay=-.inf", "optim.warmup_epochs=nan",
                                      "optim.clip_grad=inf", "optim.max_loss_growth=inf", "mvae.beta=inf"])
def test_non_finite_numbers_are_refused(override):
    field = override.split("=")[0].replace(".", r"\.")
    with pytest.raises(ConfigError, match=rf"^{field} must be a finite number"):
        load_config(None, [override])


def test_non_finite_number_in_a_file_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  blr: .nan\n")
    with pytest.raises(ConfigError, match=r"optim\.blr must be a finite number"):
        load_config(path)


def test_block_mask_needs_blocks_that_fit_what_is_masked():
    # 4x4 grid at ratio 0.75: 12 patches masked, so a block of 13 or more is never within what is left to mask
    assert load_config(None, ["mask.kind=block", "mask.block_min_patches=12"]).mask.block_min_patches == 12
    with pytest.raises(ConfigError, match=r"mask\.block_min_patches \(13\).*12 patches.*4x4.*at most 12"):
        load_config(None, ["mask.kind=block", "mask.block_min_patches=13"])
    with pytest.raises(ConfigError, match=r"mask\.block_min_patches \(200\)"):
        load_config(None, ["mask.kind=block", "mask.block_min_patches=200"])
    assert load_config(None, ["mask.kind=random", "mask.block_min_patches=200"]).mask.kind == "random"  # unused


def test_cimle_chunk_and_decode_settings():
    assert load_config(None, ["cimle.chunk=auto"]).cimle.chunk == "auto"
    assert load_config(None, ["cimle.decode=batched"]).cimle.decode == "batched"
    for item, words in [("cimle.chunk=some", "cimle.chunk must be an integer or one of ['auto']"),
                        ("cimle.chunk=0", "cimle.chunk must be null, 'auto' or >= 1"),
                        ("cimle.decode=loop", "cimle.decode must be one of")]:
        with pytest.raises(ConfigError) as err:
            load_config(None, [item])
        assert words in str(err.value) and "\n" not in str(err.value), str(err.value)
