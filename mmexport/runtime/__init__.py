"""The torch-free deployment core: what an inference server imports.

Nothing here imports PyTorch or torchvision (a test blocks both and runs an exported
model end to end); ONNX Runtime, TensorRT and the CUDA bindings are imported on first
use, inside the module that needs them.

    from mmexport import runtime

    with runtime.load("runs/ham/model.onnx") as predictor:
        prediction = predictor.predict(["lesion.jpg"])
        print(prediction.labels[0], prediction.top(3))

Modules: ``modelinfo`` (the model description and its metadata layout),
``preprocess`` (the recorded preprocessing, implemented once), ``predictor``
(``load``/``Predictor``), ``runners`` (base contract, ONNX Runtime, TensorRT),
``compare``/``tolerances`` (verification as a pure function under one policy),
``reference`` (the stored reference outputs), ``bench`` (timing harness), ``cuda``
and ``engine`` (TensorRT engines and their sidecars).
"""

from mmexport.runtime.modelinfo import MODEL_INFO_FORMAT, ModelInfo
from mmexport.runtime.predictor import Prediction, Predictor, load
from mmexport.runtime.preprocess import Preprocessing

__all__ = ["MODEL_INFO_FORMAT", "ModelInfo", "Prediction", "Predictor", "Preprocessing", "load"]
