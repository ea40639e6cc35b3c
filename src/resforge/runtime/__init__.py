"""One loaded model, whatever its file: the record that describes it, the backends that run it, the choice
among them, and the `Predictor` that evaluation, compression and the deploy jobs all call."""
