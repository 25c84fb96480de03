//! mlx's optimizers (Adam and AdamW without bias correction by default, SGD with momentum) and
//! learning-rate schedules (mlx_lm's `lr_schedule`: a named schedule, optional linear warmup),
//! with mlx's step semantics: the rate of update `n` (0-based) is `schedule(n)`.

use anyhow::{bail, Context, Result};
use candle_core::{backprop::GradStore, Tensor, Var};
use serde_json::Value;

/// A learning rate as a function of the update count.
#[derive(Debug, Clone)]
pub enum Schedule {
    Constant(f64),
    Cosine {
        init: f64,
        decay_steps: f64,
        end: f64,
    },
    Linear {
        init: f64,
        end: f64,
        steps: f64,
    },
    Exponential {
        init: f64,
        rate: f64,
    },
    Step {
        init: f64,
        rate: f64,
        step_size: u64,
    },
    /// `warmup` for steps below `boundary`, then `then` at `step - boundary`.
    Join {
        warmup: Box<Schedule>,
        then: Box<Schedule>,
        boundary: u64,
    },
}

impl Schedule {
    pub fn at(&self, step: u64) -> f64 {
        let s = step as f64;
        match self {
            Self::Constant(lr) => *lr,
            Self::Cosine { init, decay_steps, end } => {
                let s = s.min(*decay_steps);
                end + 0.5 * (1.0 + (std::f64::consts::PI / decay_steps * s).cos()) * (init - end)
            }
            Self::Linear { init, end, steps } => s.min(*steps) * ((end - init) / steps) + init,
            Self::Exponential { init, rate } => init * rate.powf(s),
            Self::Step { init, rate, step_size } => init * rate.powi((step / step_size) as i32),
            Self::Join { warmup, then, boundary } => {
                if step < *boundary {
                    warmup.at(step)
                } else {
                    then.at(step - boundary)
                }
            }
        }
    }

    /// mlx_lm's `build_schedule` from an `lr_schedule` object: `name` (cosine_decay,
    /// linear_schedule, exponential_decay, step_decay), `arguments` (the first is the initial
    /// rate), optional `warmup` steps from `warmup_init` (default 0).
    pub fn from_config(v: &Value) -> Result<Self> {
        let name = v.get("name").and_then(|n| n.as_str()).context("lr_schedule: missing string `name`")?;
        let args: Vec<f64> = v
            .get("arguments")
            .and_then(|a| a.as_array())
            .context("lr_schedule: missing list `arguments`")?
            .iter()
            .map(|x| x.as_f64())
            .collect::<Option<_>>()
            .context("lr_schedule: `arguments` must be numbers")?;
        let need = |n: usize| -> Result<()> {
            if args.len() < n {
                bail!("lr_schedule {name}: needs {n} arguments, got {}", args.len());
            }
            Ok(())
        };
        let main = match name {
            "cosine_decay" => {
                need(2)?;
                if args[1] < 1.0 {
                    bail!("lr_schedule cosine_decay: decay_steps must be greater than 0");
                }
                Self::Cosine { init: args[0], decay_steps: args[1], end: args.get(2).copied().unwrap_or(0.0) }
            }
            "linear_schedule" => {
                need(3)?;
                if args[2] < 1.0 {
                    bail!("lr_schedule linear_schedule: steps must be greater than 0");
                }
                Self::Linear { init: args[0], end: args[1], steps: args[2] }
            }
            "exponential_decay" => {
                need(2)?;
                Self::Exponential { init: args[0], rate: args[1] }
            }
            "step_decay" => {
                need(3)?;
                if args[2] < 1.0 {
                    bail!("lr_schedule step_decay: step_size must be greater than 0");
                }
                Self::Step { init: args[0], rate: args[1], step_size: args[2] as u64 }
            }
            other => bail!(
                "lr_schedule: unknown schedule `{other}` (cosine_decay, linear_schedule, exponential_decay, step_decay)"
            ),
        };
        let warmup = v.get("warmup").and_then(|w| w.as_u64()).unwrap_or(0);
        if warmup == 0 {
            return Ok(main);
        }
        let init = v.get("warmup_init").and_then(|w| w.as_f64()).unwrap_or(0.0);
        let ramp = Self::Linear { init, end: args[0], steps: warmup as f64 };
        Ok(Self::Join { warmup: Box::new(ramp), then: Box::new(main), boundary: warmup + 1 })
    }
}

#[derive(Debug, Clone, Copy)]
pub enum Kind {
    Adam { b1: f64, b2: f64, eps: f64, weight_decay: f64, bias_correction: bool },
    Sgd { momentum: f64, weight_decay: f64, dampening: f64, nesterov: bool },
}

/// An optimizer over named variables, with mlx's update rules.
pub struct Optimizer {
    pub kind: Kind,
    pub schedule: Schedule,
    /// Updates done so far.
    pub step: u64,
    /// The rate of the last update (mlx_lm reports it).
    pub last_lr: f64,
    state: Vec<(Tensor, Tensor)>,
}

impl Optimizer {
    /// `name` is mlx_lm's `optimizer` (adam, adamw, sgd) and `config` its `optimizer_config`
    /// entry for it (betas, eps, weight_decay, bias_correction; momentum, dampening, nesterov).
    pub fn new(name: &str, config: Option<&Value>, schedule: Schedule) -> Result<Self> {
        let empty = serde_json::Map::new();
        let c = match config {
            Some(Value::Object(o)) => o,
            None | Some(Value::Null) => &empty,
            Some(_) => bail!("optimizer_config.{name} must be an object"),
        };
        let num = |k: &str, d: f64| -> Result<f64> {
            match c.get(k) {
                None => Ok(d),
                Some(v) => v.as_f64().with_context(|| format!("optimizer_config.{name}.{k} must be a number")),
            }
        };
        let flag = |k: &str| c.get(k).and_then(|v| v.as_bool()).unwrap_or(false);
        let betas = match c.get("betas") {
            None => (0.9, 0.999),
            Some(v) => {
                let b: Vec<f64> =
                    v.as_array().map(|a| a.iter().filter_map(|x| x.as_f64()).collect()).unwrap_or_default();
                if b.len() != 2 {
                    bail!("optimizer_config.{name}.betas must be two numbers");
                }
                (b[0], b[1])
            }
        };
        let kind = match name.to_ascii_lowercase().as_str() {
            "adam" => Kind::Adam {
                b1: betas.0,
                b2: betas.1,
                eps: num("eps", 1e-8)?,
                weight_decay: 0.0,
                bias_correction: flag("bias_correction"),
            },
            "adamw" => Kind::Adam {
                b1: betas.0,
                b2: betas.1,
                eps: num("eps", 1e-8)?,
                weight_decay: num("weight_decay", 0.01)?,
                bias_correction: flag("bias_correction"),
            },
            "sgd" => Kind::Sgd {
                momentum: num("momentum", 0.0)?,
                weight_decay: num("weight_decay", 0.0)?,
                dampening: num("dampening", 0.0)?,
                nesterov: flag("nesterov"),
            },
            "adafactor" | "muon" => {
                bail!("--optimizer {name}: not supported by wick (adam, adamw and sgd are)")
            }
            other => bail!("--optimizer {other}: unknown optimizer (adam, adamw, sgd)"),
        };
        let last_lr = schedule.at(0);
        Ok(Self { kind, schedule, step: 0, last_lr, state: vec![] })
    }

    /// One update of `vars` with `grads` (a variable without a gradient is left alone).
    pub fn update(&mut self, vars: &[(String, Var)], grads: &[Option<Tensor>]) -> Result<()> {
        let lr = self.schedule.at(self.step);
        self.step += 1;
        self.last_lr = lr;
        if self.state.is_empty() {
            for (_, v) in vars {
                let z = v.as_tensor().zeros_like()?;
                self.state.push((z.clone(), z));
            }
        }
        for (((_, var), g), (m, v)) in vars.iter().zip(grads).zip(self.state.iter_mut()) {
            let Some(g) = g else { continue };
            // detached: a gradient's graph reaches back through the whole forward pass, and
            // optimizer state holding it would keep every step's activations alive
            let g = &g.detach();
            let w = &var.as_tensor().detach();
            let new = match self.kind {
                Kind::Adam { b1, b2, eps, weight_decay, bias_correction } => {
                    let w = if weight_decay != 0.0 { (w * (1.0 - lr * weight_decay))? } else { w.clone() };
                    *m = ((&*m * b1)? + (g * (1.0 - b1))?)?.detach();
                    *v = ((&*v * b2)? + (g.sqr()? * (1.0 - b2))?)?.detach();
                    if bias_correction {
                        let s = self.step as i32;
                        let c1 = lr / (1.0 - b1.powi(s));
                        let c2 = 1.0 / (1.0 - b2.powi(s)).sqrt();
                        (w - ((&*m * c1)? / ((v.sqrt()? * c2)? + eps)?)?)?
                    } else {
                        (w - ((&*m * lr)? / (v.sqrt()? + eps)?)?)?
                    }
                }
                Kind::Sgd { momentum, weight_decay, dampening, nesterov } => {
                    let g = if weight_decay != 0.0 { (g + (w * weight_decay)?)? } else { g.clone() };
                    if momentum <= 0.0 {
                        (w - (g * lr)?)?
                    } else {
                        let mut nv = (&*v * momentum)?;
                        nv = if dampening > 0.0 { (nv + (&g * (1.0 - dampening))?)? } else { (nv + &g)? };
                        let upd = if nesterov { (&g + (&nv * momentum)?)? } else { nv.clone() };
                        *v = nv.detach();
                        (w - (upd * lr)?)?
                    }
                }
            };
            var.set(&new.detach())?;
        }
        Ok(())
    }
}

/// The gradients of `vars` in `grads`, in order.
pub fn collect(vars: &[(String, Var)], grads: &GradStore) -> Vec<Option<Tensor>> {
    vars.iter().map(|(_, v)| grads.get(v.as_tensor()).map(|g| g.detach())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_follow_mlx_formulas() {
        // cosine_decay(1e-3, 100, 1e-5) at 0, 50, 100, 200: end + ½(1 + cos(π s / 100))(init - end)
        let c = Schedule::Cosine { init: 1e-3, decay_steps: 100.0, end: 1e-5 };
        assert!((c.at(0) - 1e-3).abs() < 1e-15);
        assert!((c.at(50) - (1e-5 + 0.5 * (1e-3 - 1e-5))).abs() < 1e-12);
        assert!((c.at(100) - 1e-5).abs() < 1e-15 && (c.at(200) - 1e-5).abs() < 1e-15);
        // warmup 10 from 0 to 1e-3, then the main schedule from its step 0 at step 11
        let w = Schedule::from_config(&serde_json::json!({
            "name": "cosine_decay", "arguments": [1e-3, 100, 1e-5], "warmup": 10}))
        .unwrap();
        assert!((w.at(0) - 0.0).abs() < 1e-15);
        assert!((w.at(5) - 5e-4).abs() < 1e-12);
        assert!((w.at(10) - 1e-3).abs() < 1e-12);
        assert!((w.at(11) - 1e-3).abs() < 1e-12);
        assert!((w.at(61) - (1e-5 + 0.5 * (1e-3 - 1e-5))).abs() < 1e-12);
        let s = Schedule::Step { init: 1.0, rate: 0.5, step_size: 3 };
        assert_eq!((s.at(2), s.at(3), s.at(7)), (1.0, 0.5, 0.25));
        assert!(Schedule::from_config(&serde_json::json!({"name": "nope", "arguments": [1]})).is_err());
    }

    #[test]
    fn adam_step_is_mlx_adam() {
        // one Adam step from zero state: m = 0.1 g, v = 0.001 g², w -= lr m / (√v + eps)
        let w = Var::new(&[1.0f32, -2.0], &candle_core::Device::Cpu).unwrap();
        let g = Tensor::new(&[0.5f32, -1.0], &candle_core::Device::Cpu).unwrap();
        let mut o = Optimizer::new("adam", None, Schedule::Constant(0.01)).unwrap();
        o.update(&[("w".into(), w.clone())], &[Some(g)]).unwrap();
        let got: Vec<f32> = w.as_tensor().to_vec1().unwrap();
        let want = |w: f64, g: f64| w - 0.01 * (0.1 * g) / ((0.001 * g * g).sqrt() + 1e-8);
        assert!((got[0] as f64 - want(1.0, 0.5)).abs() < 1e-6);
        assert!((got[1] as f64 - want(-2.0, -1.0)).abs() < 1e-6);
    }
}
