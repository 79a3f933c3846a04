"""Reads mltap's request log with TensorFlow and the official PredictionLog message.

Usage: python read_request_log.py DIR   (DIR: the request log's directory, one folder per model)
Needs: pip install tensorflow-cpu tensorflow-serving-api
"""
import glob
import os
import sys

import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2


def main(directory):
    files = sorted(glob.glob(os.path.join(directory, "*", "*.tfrecord")))
    if not files:
        sys.exit(f"no closed .tfrecord file under {directory}")
    counts = {}
    for raw in tf.data.TFRecordDataset(files):
        log = prediction_log_pb2.PredictionLog.FromString(raw.numpy())
        kind = log.WhichOneof("log_type")
        spec = log.log_metadata.model_spec
        counts[(spec.name, kind)] = counts.get((spec.name, kind), 0) + 1
        if kind == "predict_log" and counts[(spec.name, kind)] == 1:
            request, response = log.predict_log.request, log.predict_log.response
            inputs = {name: tf.make_ndarray(t).shape for name, t in request.inputs.items()}
            outputs = {name: tf.make_ndarray(t).shape for name, t in response.outputs.items()}
            print(f"{spec.name} v{spec.version.value} {spec.signature_name}: inputs {inputs} outputs {outputs}")
    for (model, kind), n in sorted(counts.items()):
        print(f"{model}: {n} {kind} records")
    print(f"{len(files)} files, every record's CRC checked by TFRecordDataset")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "mltap-out/requests")
