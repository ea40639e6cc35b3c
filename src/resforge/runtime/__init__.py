"""One loaded model, whatever its file: the record that describes it (`record`), the file as found
(`source`), the engines that run it (`backends`, `convert`), a source put on one of them (`build`) or on
the fastest here (`auto`), timing it (`measure`), the one batch loop with test-time augmentation
(`inference`), and the `Predictor` that evaluation, compression and the deploy jobs all call."""
