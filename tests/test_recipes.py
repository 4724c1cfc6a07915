"""The recipes compose: every base of recipes/_base_ owns its own top-level keys (a dataset `data`, a
model `model`, a schedule `optimizer` / `scheduler` / `train`, a technique `technique` or `phases`),
and a top-level recipe is one base of each kind plus its output folder. mmengine refuses the same
top-level key in two bases of one `_base_` list, so a config swaps a base of a recipe's list for
another of the same kind; each kind is tested here through `timm_exits.config.load_config`."""
import ast
from pathlib import Path

import pytest
from mmengine.config import Config

from timm_exits.config import load_config, phase_configs
from timm_exits.train.techniques import TECHNIQUES

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
KINDS = {"datasets": {"data"}, "models": {"model"}, "schedules": {"optimizer", "scheduler", "train"},
         "techniques": {"technique", "phases"}}
TOP_LEVEL = ["cifar.py", "digits.py", "imagenet.py", "resnet50_adn.py", "resnet50_exits.py", "sdn_cifar.py",
             "sdn_cifar_ic_only.py"]


def _bases(kind: str):
    return sorted((RECIPES / "_base_" / kind).glob("*.py"))


def _own_keys(path: Path) -> set:
    """The names a config file assigns itself (not those its own bases give it)."""
    tree = ast.parse(path.read_text())
    return {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)}


def _base_list(recipe: str):
    tree = ast.parse((RECIPES / recipe).read_text())
    value = next(node.value for node in tree.body if isinstance(node, ast.Assign) and node.targets[0].id == "_base_")
    return [str((RECIPES / p).resolve()) for p in ast.literal_eval(value)]


def _write(tmp_path: Path, bases, body: str = "") -> Path:
    path = tmp_path / "mine.py"
    path.write_text(f"_base_ = {[str(b) for b in bases]!r}\n{body}")
    return path


def _compose(tmp_path: Path, bases, body: str = "") -> dict:
    return load_config(str(_write(tmp_path, bases, body)))


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_of_base_owns_its_keys(kind):
    for path in _bases(kind):
        keys = set(Config.fromfile(str(path)).to_dict())
        assert keys and keys <= KINDS[kind], f"{path.name} sets {keys - KINDS[kind]}, which {kind} bases do not own"


@pytest.mark.parametrize("recipe", TOP_LEVEL)
def test_a_recipe_is_one_base_of_each_kind_and_its_output_folder(recipe):
    assert _own_keys(RECIPES / recipe) == {"_base_", "output_dir"}
    kinds = [Path(b).parent.name for b in _base_list(recipe)]
    assert kinds == list(KINDS), f"{recipe} lists {kinds}"


# what the README's recipe table and each recipe's header state
STATED = {
    "digits.py": dict(model="msdnet_cifar_5exit", dir="output/data/digits", opt=("momentum", 0.1), epochs=4,
                      phases=[("phase1_ge", "CrossEntropy"), ("phase2_isc_ofa", "OneForAll")], temperature=3.0, gamma=0.9),
    "cifar.py": dict(model="msdnet_cifar_7exit", dir=None, opt=("momentum", 0.1), epochs=300,
                     phases=[("phase1_ge", "CrossEntropy"), ("phase2_isc_ofa", "OneForAll")], temperature=3.0, gamma=0.9),
    "imagenet.py": dict(model="msdnet_imagenet_5exit", dir=None, opt=("momentum", 0.1), epochs=90,
                        phases=[("phase1_ge", "CrossEntropy"), ("phase2_isc_ofa", "OneForAll")], temperature=1.0, gamma=0.1),
    "resnet50_adn.py": dict(model="resnet50_adn", dir=None, opt=("momentum", 0.1), epochs=150,
                            phases=[("train", "ADN")], temperature=1.0, gamma=None),
    "resnet50_exits.py": dict(model="resnet50_exits", dir=None, opt=("momentum", 0.01), epochs=30,
                              phases=[("train", "CrossEntropy")], temperature=None, gamma=None),
    "sdn_cifar.py": dict(model="resnet18_exits", dir=None, opt=("momentum", 0.1), epochs=100,
                         phases=[("train", "CrossEntropy")], temperature=None, gamma=None),
    "sdn_cifar_ic_only.py": dict(model="resnet18_exits", dir=None, opt=("momentum", 0.1), epochs=100,
                                 phases=[("cnn", "CrossEntropy"), ("ic_only", "CrossEntropy")], temperature=None, gamma=None),
}


@pytest.mark.parametrize("recipe", TOP_LEVEL)
def test_recipes_resolve_to_what_they_state(recipe):
    config, stated = load_config(str(RECIPES / recipe)), STATED[recipe]
    assert config["model"]["name"] == stated["model"] and config["data"]["dir"] == stated["dir"]
    assert (config["optimizer"]["opt"], config["optimizer"]["lr"]) == stated["opt"]
    assert config["train"]["epochs"] == stated["epochs"]
    assert config["data"]["train_split"] == "train" and config["data"]["test_split"] == "val"
    runs = phase_configs(config)
    assert [(name, run["technique"]["type"]) for name, run in runs] == stated["phases"]
    last = runs[-1][1]["technique"]
    assert (last.get("temperature"), last.get("gamma")) == (stated["temperature"], stated["gamma"])
    assert config["output_dir"] == "output/" + {"digits.py": "train"}.get(recipe, recipe[:-3])


def test_schedules_as_stated():
    cifar, imagenet, adn = (load_config(str(RECIPES / r)) for r in ("cifar.py", "imagenet.py", "resnet50_adn.py"))
    assert cifar["scheduler"]["decay_milestones"] == [150, 225] and cifar["data"]["transform"] == "pad_crop"
    assert imagenet["scheduler"]["decay_epochs"] == 30 and imagenet["optimizer"]["filter_bias_and_bn"] is False
    assert adn["scheduler"]["decay_milestones"] == [60, 100, 140] and adn["optimizer"]["filter_bias_and_bn"] is True
    assert phase_configs(load_config(str(RECIPES / "resnet50_exits.py")))[0][1]["technique"]["gradient_equilibrium"]


def test_every_split_folder_is_train_and_val():
    for path in _bases("datasets"):
        data = load_config(str(path), cfg_options={"model.name": "x"})["data"]
        assert (data["train_split"], data["test_split"]) == ("train", "val"), path.name


def test_swapping_the_dataset_of_a_recipe(tmp_path):
    bases = _base_list("cifar.py")
    config = _compose(tmp_path, [RECIPES / "_base_/datasets/cifar10.py", *bases[1:]])
    assert config["data"]["mean"] == (0.4914, 0.4824, 0.4467)
    cifar = load_config(str(RECIPES / "cifar.py"))
    same = lambda c: {k: v for k, v in c.items() if k not in ("data", "output_dir")}  # noqa: E731
    assert same(config) == same(cifar)
    digits = _compose(tmp_path, [RECIPES / "_base_/datasets/digits.py", *bases[1:]])
    assert digits["data"]["embedded"] == "digits" and digits["model"]["name"] == "msdnet_cifar_7exit"


def test_swapping_the_model_of_a_recipe(tmp_path):
    bases = _base_list("imagenet.py")
    config = _compose(tmp_path, [bases[0], RECIPES / "_base_/models/resnet50_exits.py", *bases[2:]])
    assert config["model"]["name"] == "resnet50_exits"
    assert [run["technique"]["type"] for _, run in phase_configs(config)] == ["CrossEntropy", "OneForAll"]
    assert config["data"]["input_size"] == (3, 224, 224) and config["train"]["epochs"] == 90


def test_swapping_the_technique_of_a_recipe(tmp_path):
    bases = _base_list("cifar.py")
    config = _compose(tmp_path, [*bases[:3], RECIPES / "_base_/techniques/hdkd.py"])
    assert config["phases"] is None and config["technique"]["type"] == "HDKD"
    assert config["model"]["name"] == "msdnet_cifar_7exit" and config["scheduler"]["decay_milestones"] == [150, 225]
    # and back: IMTA's phases on the ADN recipe's data and schedule
    adn = _base_list("resnet50_adn.py")
    config = _compose(tmp_path, [*adn[:3], RECIPES / "_base_/techniques/imta_imagenet.py"])
    assert [name for name, _ in phase_configs(config)] == ["phase1_ge", "phase2_isc_ofa"]


def test_a_recipe_inherited_whole_takes_changes_in_the_config_itself(tmp_path):
    config = _compose(tmp_path, [RECIPES / "cifar.py"], "data = dict(mean=(0.4914, 0.4824, 0.4467))\n")
    assert config["data"]["mean"] == (0.4914, 0.4824, 0.4467) and config["data"]["transform"] == "pad_crop"


def test_a_recipe_composed_with_a_base_of_a_kind_it_has_takes_the_later_base(tmp_path):
    """Two bases that both set `data` (mmengine 0.10.7 alone refuses them): merged in the order listed."""
    with pytest.raises(KeyError, match="Duplicate key is not allowed among bases"):
        Config.fromfile(str(_write(tmp_path, [RECIPES / "cifar.py", RECIPES / "_base_/datasets/cifar10.py"])))
    recipe = load_config(str(RECIPES / "cifar.py"))
    config = _compose(tmp_path, [RECIPES / "cifar.py", RECIPES / "_base_/datasets/cifar10.py"],
                      "train = dict(epochs=3)\n")
    cifar10 = Config.fromfile(str(RECIPES / "_base_/datasets/cifar10.py")).to_dict()["data"]
    assert all(config["data"][k] == v for k, v in cifar10.items())  # the later base's data
    assert config["data"]["mean"] != recipe["data"]["mean"]
    assert config["train"]["epochs"] == 3 and config["model"] == recipe["model"]  # the file's own keys, the recipe's
    assert config["phases"] == recipe["phases"] and config["optimizer"] == recipe["optimizer"]
    model = _compose(tmp_path, [RECIPES / "digits.py", RECIPES / "_base_/models/msdnet_cifar.py"])
    assert model["model"]["name"] == "msdnet_cifar_7exit" and model["data"] == load_config(str(RECIPES / "digits.py"))["data"]


def test_sdn_recipes_as_stated():
    """SDN's two regimes (Kaya et al., ICML 2019, its network_architectures.py / aux_funcs.py values)."""
    joint = load_config(str(RECIPES / "sdn_cifar.py"))
    assert joint["model"]["kwargs"] == dict(exits="sdn", head="sdn", input_size=(3, 32, 32))
    assert joint["technique"]["exit_weights"] == "sdn" and joint["technique"]["regime"] == "joint"
    assert joint["optimizer"] == dict(opt="momentum", lr=0.1, momentum=0.9, weight_decay=1e-4, filter_bias_and_bn=False)
    assert joint["scheduler"]["decay_milestones"] == [35, 60, 85] and joint["data"]["batch_size"] == 128
    (cnn, first), (ic, second) = phase_configs(load_config(str(RECIPES / "sdn_cifar_ic_only.py")))
    assert first["technique"]["regime"] == "backbone" and first["train"]["epochs"] == 100
    assert second["technique"]["regime"] == "heads_only" and second["technique"]["freeze_bn_stats"] is False
    assert second["technique"]["exit_weights"] is None  # IC-only: the plain sum of the ICs' losses
    assert second["optimizer"] == dict(opt="adam", lr=1e-3, weight_decay=1e-4, filter_bias_and_bn=False)
    assert second["scheduler"]["decay_milestones"] == [15] and second["train"]["epochs"] == 25


@pytest.mark.parametrize("study", sorted(p.name for p in (ROOT / "benchmarks" / "cifar10_study").glob("*.py")
                                         if p.name != "_base_.py"))
def test_the_accuracy_studys_configs_resolve_with_their_techniques(study):
    """The CIFAR-10 study's configurations (run by benchmarks/accuracy_cifar10.py, not by the tests) stay
    valid configs: each resolves, phase by phase, to a registered technique with its options checked."""
    runs = phase_configs(load_config(str(ROOT / "benchmarks" / "cifar10_study" / study), data_dir="/data/cifar10"))
    assert runs and all(run["technique"]["type"] in TECHNIQUES for _, run in runs)
