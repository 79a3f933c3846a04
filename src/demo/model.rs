//! The demo's models: small linear classifiers with fixed weights, named inputs (numeric
//! features plus one categorical feature) and TF Serving's Estimator-style outputs
//! (`probabilities`, `class_ids`). `churn` is a 3-class softmax regression over eight
//! numeric features and `country`; `fraud` is a binary sigmoid over four numeric
//! features and `channel`, so that both multiclass and binary metrics show; `eta` is a
//! linear regression (a delivery's minutes) over four numeric features and `weather`,
//! so that regression metrics show too.
//!
//! This module only computes; it never touches the network. The same type also serves
//! as the "true" process the traffic generator draws labels from, which is why its
//! weights can be edited (`with_concept_drift`).

/// A numeric input, standardized before the linear layer so that weights are on one
/// scale: `z = (x - center) / scale`.
#[derive(Debug, Clone, PartialEq)]
pub struct NumericInput {
    /// The input's name in the signature and in requests.
    pub name: &'static str,
    /// Typical value of the feature; the standardization's center.
    pub center: f64,
    /// Typical spread of the feature; the standardization's scale (never zero).
    pub scale: f64,
}

/// How the logits become probabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    /// Softmax over one logit per class; `probabilities` is `[n, k]`.
    Softmax,
    /// Sigmoid of one logit; `probabilities` is `[n, 1]`, the probability of class 1.
    Sigmoid,
    /// A regression: the one logit is the prediction; `predictions` is `[n, 1]`.
    Linear,
}

/// One row of model input, in the order of the model's numeric inputs.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Values of the numeric inputs, by position in `LinearModel::numeric`.
    pub numeric: Vec<f64>,
    /// Value of the categorical input; unknown categories add nothing to the logits.
    pub category: String,
}

/// A linear classifier with fixed weights.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearModel {
    /// Model name, as clients address it (`/v1/models/NAME`).
    pub name: &'static str,
    /// The one served version.
    pub version: i64,
    /// Numeric inputs, in weight order.
    pub numeric: Vec<NumericInput>,
    /// Name of the categorical (string) input.
    pub categorical: &'static str,
    /// Known categories of the categorical input, in offset order.
    pub categories: Vec<&'static str>,
    /// Class names by class index (also the labels `Classify` answers with).
    pub class_names: Vec<&'static str>,
    /// Softmax or sigmoid.
    pub head: Head,
    /// `weights[logit][feature]` on standardized numeric inputs.
    pub weights: Vec<Vec<f64>>,
    /// One bias per logit.
    pub bias: Vec<f64>,
    /// `category_offsets[category][logit]`, added to the logits.
    pub category_offsets: Vec<Vec<f64>>,
}

impl LinearModel {
    /// The 3-class churn model: will a customer `stay`, `downgrade` or `churn`?
    pub fn churn() -> LinearModel {
        let numeric = vec![
            NumericInput { name: "age", center: 42.0, scale: 12.0 },
            NumericInput { name: "income", center: 55.0, scale: 20.0 },
            NumericInput { name: "tenure_months", center: 30.0, scale: 18.0 },
            NumericInput { name: "monthly_charges", center: 70.0, scale: 25.0 },
            NumericInput { name: "support_calls", center: 2.0, scale: 1.5 },
            NumericInput { name: "usage_hours", center: 20.0, scale: 8.0 },
            NumericInput { name: "late_payments", center: 1.0, scale: 1.0 },
            NumericInput { name: "satisfaction", center: 3.5, scale: 1.0 },
        ];
        //                 age   income tenure charges calls usage  late  satisf.
        let weights = vec![
            vec![0.3, 0.2, 1.6, -0.4, -0.9, 0.9, -0.5, 1.4],  // stay
            vec![0.0, -1.3, 0.2, 1.5, 0.2, -0.8, 0.3, -0.2],  // downgrade
            vec![-0.4, 0.0, -1.2, 0.7, 1.7, -0.3, 1.4, -1.6], // churn
        ];
        LinearModel {
            name: "churn",
            version: 1,
            numeric,
            categorical: "country",
            categories: vec!["us", "gb", "de", "fr", "br", "in"],
            class_names: vec!["stay", "downgrade", "churn"],
            head: Head::Softmax,
            weights,
            bias: vec![1.0, 0.0, -0.3],
            category_offsets: vec![
                vec![0.2, 0.0, -0.2], // us
                vec![0.1, 0.1, -0.1], // gb
                vec![0.4, 0.0, -0.3], // de
                vec![0.0, 0.2, 0.0],  // fr
                vec![-0.3, 0.1, 0.6], // br
                vec![-0.2, 0.4, 0.3], // in
            ],
        }
    }

    /// The binary fraud model: is a card transaction fraudulent?
    pub fn fraud() -> LinearModel {
        LinearModel {
            name: "fraud",
            version: 1,
            numeric: vec![
                NumericInput { name: "amount", center: 80.0, scale: 60.0 },
                NumericInput { name: "hour_of_day", center: 14.0, scale: 5.0 },
                NumericInput { name: "distance_km", center: 15.0, scale: 20.0 },
                NumericInput { name: "account_age_days", center: 700.0, scale: 400.0 },
            ],
            categorical: "channel",
            categories: vec!["pos", "web", "app"],
            class_names: vec!["legit", "fraud"],
            head: Head::Sigmoid,
            weights: vec![vec![1.1, -0.5, 1.3, -1.0]],
            bias: vec![-2.2],
            category_offsets: vec![vec![-0.4], vec![0.7], vec![0.1]],
        }
    }

    /// The regression model: how many minutes will a delivery take?
    pub fn eta() -> LinearModel {
        LinearModel {
            name: "eta",
            version: 1,
            numeric: vec![
                NumericInput { name: "distance_km", center: 4.0, scale: 2.5 },
                NumericInput { name: "items", center: 3.0, scale: 2.0 },
                NumericInput { name: "hour_of_day", center: 14.0, scale: 5.0 },
                NumericInput { name: "courier_load", center: 0.6, scale: 0.2 },
            ],
            categorical: "weather",
            categories: vec!["clear", "rain", "snow"],
            class_names: Vec::new(),
            head: Head::Linear,
            weights: vec![vec![6.0, 2.0, 0.5, 4.0]],
            bias: vec![28.0],
            category_offsets: vec![vec![0.0], vec![5.0], vec![12.0]],
        }
    }

    /// Whether the model is a regression (`Head::Linear`).
    pub fn is_regression(&self) -> bool {
        self.head == Head::Linear
    }

    /// Number of classes (2 for a sigmoid head, none for a regression).
    pub fn classes(&self) -> usize {
        match self.head {
            Head::Softmax => self.weights.len(),
            Head::Sigmoid => 2,
            Head::Linear => 0,
        }
    }

    /// Width of the model's output: k probabilities for softmax, 1 for sigmoid, the one
    /// prediction of a regression.
    pub fn probability_width(&self) -> usize {
        match self.head {
            Head::Softmax => self.weights.len(),
            Head::Sigmoid | Head::Linear => 1,
        }
    }

    /// Position of a numeric input by name.
    pub fn numeric_index(&self, name: &str) -> Option<usize> {
        self.numeric.iter().position(|input| input.name == name)
    }

    /// All input names, numeric first, in signature order.
    pub fn input_names(&self) -> Vec<&'static str> {
        let mut names: Vec<&'static str> = self.numeric.iter().map(|input| input.name).collect();
        names.push(self.categorical);
        names
    }

    fn logits(&self, row: &Row) -> Vec<f64> {
        let category = self.categories.iter().position(|c| *c == row.category);
        self.weights
            .iter()
            .enumerate()
            .map(|(logit, weights)| {
                let linear: f64 = weights
                    .iter()
                    .zip(&self.numeric)
                    .zip(&row.numeric)
                    .map(|((w, input), x)| w * (x - input.center) / input.scale)
                    .sum();
                let offset = category.map(|c| self.category_offsets[c][logit]).unwrap_or(0.0);
                linear + self.bias[logit] + offset
            })
            .collect()
    }

    /// The `probabilities` output of one row: k values summing to 1 (softmax) or the
    /// probability of class 1 (sigmoid). Non-finite inputs give non-finite outputs,
    /// as a TensorFlow graph would.
    pub fn probabilities(&self, row: &Row) -> Vec<f64> {
        let logits = self.logits(row);
        match self.head {
            Head::Softmax => {
                let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let exp: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
                let sum: f64 = exp.iter().sum();
                exp.iter().map(|e| e / sum).collect()
            }
            Head::Sigmoid => vec![1.0 / (1.0 + (-logits[0]).exp())],
            Head::Linear => vec![logits[0]],
        }
    }

    /// The class a row's probabilities predict (argmax, or p > 0.5 for sigmoid).
    pub fn class_id(&self, probabilities: &[f64]) -> usize {
        match self.head {
            Head::Softmax => {
                probabilities
                    .iter()
                    .enumerate()
                    .fold((0, f64::NEG_INFINITY), |best, (i, &p)| if p > best.1 { (i, p) } else { best })
                    .0
            }
            Head::Sigmoid => usize::from(probabilities.first().copied().unwrap_or(0.0) > 0.5),
            Head::Linear => 0,
        }
    }

    /// Per-class scores of one row for `Classify`: k values, also for a sigmoid head
    /// (`[1 - p, p]`), as a TF classification signature answers.
    pub fn class_scores(&self, probabilities: &[f64]) -> Vec<f64> {
        match self.head {
            Head::Softmax => probabilities.to_vec(),
            Head::Sigmoid => {
                let p = probabilities.first().copied().unwrap_or(0.0);
                vec![1.0 - p, p]
            }
            Head::Linear => Vec::new(),
        }
    }

    /// The world after the concept drift: the same inputs relate differently to the
    /// outcome, so a model that was right before is now wrong more often. The traffic
    /// generator samples true labels from this model after the drift point.
    pub fn with_concept_drift(&self) -> LinearModel {
        let mut drifted = self.clone();
        match self.head {
            Head::Softmax => {
                // Price now drives churn rather than downgrades, loyalty stops
                // protecting, and satisfaction surveys stop predicting anything.
                let charges = self.numeric_index("monthly_charges");
                let satisfaction = self.numeric_index("satisfaction");
                let tenure = self.numeric_index("tenure_months");
                let calls = self.numeric_index("support_calls");
                if let (Some(charges), Some(satisfaction), Some(tenure), Some(calls), 3) =
                    (charges, satisfaction, tenure, calls, drifted.weights.len())
                {
                    // A new support team: customers who call now get helped and stay.
                    drifted.weights[0][calls] = 1.0;
                    drifted.weights[2][calls] = -0.5;
                    drifted.weights[0][charges] = -1.0;
                    drifted.weights[1][charges] = -0.5;
                    drifted.weights[2][charges] = 2.0;
                    drifted.weights[0][tenure] *= 0.3;
                    for logit in drifted.weights.iter_mut() {
                        logit[satisfaction] = 0.0;
                    }
                    drifted.bias = vec![0.2, 0.2, 0.4];
                }
            }
            Head::Sigmoid => {
                // Fraudsters move to small local amounts: amount and distance flip sign.
                for w in drifted.weights[0].iter_mut().take(3) {
                    *w = -*w;
                }
                drifted.bias[0] += 0.5;
            }
            Head::Linear => {
                // A new courier partner: every kilometre takes longer and rain hurts more,
                // so the served model under-predicts and its MAE grows.
                drifted.weights[0][0] *= 1.8;
                drifted.bias[0] += 4.0;
                if let Some(rain) = drifted.category_offsets.get_mut(1) {
                    rain[0] += 8.0;
                }
            }
        }
        drifted
    }
}

/// The models the demo serves, by name.
pub fn demo_models() -> Vec<LinearModel> {
    vec![LinearModel::churn(), LinearModel::fraud(), LinearModel::eta()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_probabilities_sum_to_one_and_argmax_is_the_class() {
        let model = LinearModel::churn();
        let row = Row { numeric: vec![30.0, 40.0, 2.0, 110.0, 6.0, 5.0, 4.0, 1.0], category: "br".into() };
        let p = model.probabilities(&row);
        assert_eq!(p.len(), 3);
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert_eq!(model.class_id(&p), 2, "an unhappy, late-paying, calling customer churns: {p:?}");
    }

    #[test]
    fn sigmoid_scores_are_complementary() {
        let model = LinearModel::fraud();
        let row = Row { numeric: vec![400.0, 3.0, 200.0, 10.0], category: "web".into() };
        let p = model.probabilities(&row);
        assert_eq!(p.len(), 1);
        assert!(p[0] > 0.5);
        assert_eq!(model.class_scores(&p), vec![1.0 - p[0], p[0]]);
        assert_eq!(model.class_id(&p), 1);
    }

    #[test]
    fn the_regression_predicts_minutes_and_its_drift_makes_deliveries_slower() {
        let model = LinearModel::eta();
        let row = Row { numeric: vec![4.0, 3.0, 14.0, 0.6], category: "rain".into() };
        assert_eq!(model.probabilities(&row), vec![33.0]);
        assert!(model.is_regression() && model.classes() == 0);
        let far = Row { numeric: vec![9.0, 3.0, 14.0, 0.6], category: "rain".into() };
        let drifted = model.with_concept_drift();
        assert!(drifted.probabilities(&far)[0] - model.probabilities(&far)[0] > 10.0);
    }

    #[test]
    fn concept_drift_changes_the_outcome_of_the_same_row() {
        let model = LinearModel::churn();
        let row = Row { numeric: vec![42.0, 55.0, 30.0, 120.0, 2.0, 20.0, 1.0, 3.5], category: "us".into() };
        let before = model.class_id(&model.probabilities(&row));
        let after = model.class_id(&model.with_concept_drift().probabilities(&row));
        assert_ne!(before, after);
    }
}
