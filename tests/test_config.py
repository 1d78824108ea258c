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


def test_flat_synthetic_fields_of_older_runs_read_as_the_section():
    """Run folders and checkpoints written with ``data.synthetic_<key>`` load as ``data.synthetic``."""
    from study.config import config_from_dict

    flat = {"data": {"name": "synthetic", "synthetic_kind": "hidden", "synthetic_classes": 4,
                     "synthetic_cue": 2.0, "synthetic_distractor": 0.75}}
    cfg = config_from_dict(flat)
    assert (cfg.data.synthetic.classes, cfg.data.synthetic.cue, cfg.data.synthetic.distractor) == (4, 2.0, 0.75)
    mnist = config_from_dict({"data": {"name": "mnist", "synthetic_kind": "gratings", "synthetic_classes": 10}})
    assert mnist.data.name == "mnist"  # the unused synthetic fields of an MNIST run do not matter
    with pytest.raises(ConfigError, match="synthetic_kind='gratings'"):
        config_from_dict({"data": {"name": "synthetic", "synthetic_kind": "gratings"}})


def test_a_synthetic_setting_is_named_with_its_section():
    with pytest.raises(ConfigError, match="data.synthetic.cue"):
        load_config(None, ["data.synthetic.cue=0"])
    with pytest.raises(ConfigError, match="unknown key.*data.synthetic"):
        load_config(None, ["data.synthetic.kind=hidden"])
