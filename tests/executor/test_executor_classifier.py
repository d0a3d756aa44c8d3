"""Classifiers (converted with a ClassifierConfig): the executor predicts the class label and the
{class: probability} dictionary that Core ML predicts, from the program's probabilities."""
import coremltools as ct
import numpy as np
import pytest
import torch

from coreml_sd.runtime.executor import ReferenceModel

FEATURES, CLASSES = 6, 4


def convert_classifier(module: torch.nn.Module, classes: list, path, **config) -> ReferenceModel:
    example = torch.zeros(1, FEATURES)
    model = ct.convert(
        torch.jit.trace(module, example),
        inputs=[ct.TensorType(name="features", shape=example.shape, dtype=np.float32)],
        classifier_config=ct.ClassifierConfig(classes, **config),
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS16,
    )
    model.save(str(path))
    return ReferenceModel(path)


@pytest.mark.parametrize("classes", [["cat", "dog", "bird", "fish"], [3, 1, 4, 15]], ids=["str", "int"])
def test_label_and_probabilities_match_the_torch_classifier(tmp_path, classes):
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Linear(FEATURES, CLASSES), torch.nn.Softmax(dim=-1)).eval()
    model = convert_classifier(network, classes, tmp_path / "classifier.mlpackage")
    assert model.output_description == {}  # the label and the dictionary are not multi-arrays
    predicted = set()
    for seed in range(8):
        features = np.random.default_rng(seed).normal(0.0, 2.0, (1, FEATURES)).astype(np.float32)
        with torch.no_grad():
            expected = network(torch.from_numpy(features))[0].double().numpy()
        outputs = model.predict(dict(features=features))
        assert set(outputs) == {"classLabel", "classLabel_probs"}
        label, probabilities = outputs["classLabel"], outputs["classLabel_probs"]
        assert type(label) is type(classes[0]) and list(probabilities) == classes
        assert all(type(p) is float for p in probabilities.values())
        # float16 numerics: the probabilities are a float16 softmax, within 2e-3 of float64's.
        np.testing.assert_allclose(list(probabilities.values()), expected, atol=2e-3)
        top, runner_up = np.sort(expected)[::-1][:2]
        if top - runner_up > 4e-3:  # a clear winner, whatever the rounding
            assert label == classes[int(np.argmax(expected))]
        predicted.add(label)
    assert len(predicted) > 1  # the inputs do tell the classes apart


def test_values_are_not_normalised_and_the_label_name_is_configurable(tmp_path):
    # Core ML maps the values it is given to the classes; it does not apply a softmax.
    network = torch.nn.ReLU().eval()
    classes = [f"class {i}" for i in range(FEATURES)]
    model = convert_classifier(network, classes, tmp_path / "relu.mlpackage", predicted_feature_name="kind")
    features = np.array([[1.0, -2.0, 3.0, 0.5, 2.5, -1.0]], np.float32)
    outputs = model.predict(dict(features=features))
    assert outputs["kind"] == "class 2"
    assert outputs["kind_probs"] == dict(zip(classes, [1.0, 0.0, 3.0, 0.5, 2.5, 0.0]))
