"""One config object, one CLI: presets, flags, and clear errors."""

import json

import pytest

from san_fast.config import Config, build_parser, load_config, resolve


def test_no_arguments_on_cpu_gives_the_cpu_preset():
    cfg = resolve({}, cuda_available=False)
    assert cfg.preset == "cpu" and cfg.dataset == "synthetic"


def test_gpu_and_real_datasets_default_to_the_paper():
    assert resolve({}, cuda_available=True).embed_dim == 1024
    cfg = resolve({"dataset": "coco27", "data_root": "x"}, cuda_available=False)
    assert cfg.preset == "paper" and cfg.num_classes() == 27 and cfg.eval_protocol == "picie"
    assert resolve({"dataset": "potsdam3", "data_root": "x"}, cuda_available=True).eval_protocol == "iic"


def test_flags_override_presets_and_ablations_invert():
    args = build_parser().parse_args(["--epochs", "2", "--no-token-matcher", "--no-batch-wise",
                                      "--no-reconstruction", "--compile", "--amp", "bf16",
                                      "--encoder", "unet", "--vit-depth", "4"])
    cfg = resolve(vars(args), cuda_available=False)
    assert cfg.epochs == 2 and cfg.compile and cfg.amp == "bf16"
    assert not (cfg.token_matcher or cfg.batch_wise or cfg.reconstruction)
    assert cfg.encoder == "unet" and cfg.vit_depth == 4


def test_fold_bn_flag_and_its_checks():
    assert resolve({}, cuda_available=False).fold_bn == "auto"
    cfg = resolve(vars(build_parser().parse_args(["--fold-bn", "off"])), cuda_available=False)
    assert cfg.fold_bn == "off"
    with pytest.raises(ValueError, match="--fold-bn on .* not torch"):
        resolve(vars(build_parser().parse_args(["--fold-bn", "on", "--seat-impl", "torch"])), cuda_available=False)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--fold-bn", "maybe"])


def test_real_dataset_needs_a_root():
    with pytest.raises(ValueError, match="--data-root"):
        resolve({"dataset": "cityscapes"}, cuda_available=False)


def test_bad_values_say_what_was_expected():
    with pytest.raises(ValueError, match="expected one of"):
        Config(encoder="vgg").validate()
    with pytest.raises(ValueError, match="multiple of --patch-size"):
        Config(crop_size=100).validate()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--dataset", "imagenet"])


def test_round_trip(tmp_path):
    cfg = resolve({"seed": 3}, cuda_available=False)
    path = tmp_path / "config.json"
    path.write_text(cfg.to_json())
    assert load_config(str(path)) == cfg
    assert json.loads(cfg.to_json())["seed"] == 3


def test_potsdam_presets_carry_the_papers_colour_augmentation():
    cfg = resolve({"dataset": "potsdam", "data_root": "x"}, cuda_available=True)
    assert cfg.color_jitter == 0.1 and cfg.color_drop == 0.2
    assert resolve({}, cuda_available=False).color_jitter == 0.0


def test_programmatic_configs_are_checked_too():
    from san_fast.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match="--batch-size '16': expected an integer >= 1"):
        Config(batch_size="16").validate()
    with pytest.raises(ConfigError, match="--num-semantics 0"):
        Config(num_semantics=0).validate()  # 0 once meant "the class count"
    with pytest.raises(ConfigError, match="--vit-heads 0"):
        Config(vit_heads=0).validate()  # 0 once became one head
    with pytest.raises(ConfigError, match=r"unknown config fields \['bogus'\]"):
        config_from_dict(dict(Config().to_dict(), bogus=1))
    assert Config(dataset="synthetic").validate().vit_num_heads() == 16


def test_parser_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--epochs", "x"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "train.py: error: argument --epochs: invalid int value: 'x' (see --help)\n"


def test_compile_mode_flag_and_its_check():
    cfg = resolve({"compile": True, "compile_mode": "reduce-overhead"})
    assert cfg.compile_mode == "reduce-overhead"
    assert resolve({}).compile_mode == "auto"
    assert resolve({"compile_mode": "default"}).compile_mode == "default"  # auto and default need no --compile
    with pytest.raises(ValueError, match="--compile-mode reduce-overhead needs --compile"):
        resolve({"compile_mode": "reduce-overhead"})
    with pytest.raises(ValueError, match="--compile-mode 'fast': expected one of auto, default, reduce-overhead"):
        resolve({"compile": True, "compile_mode": "fast"})
