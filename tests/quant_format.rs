//! The affine format against mx.quantize / mx.dequantize goldens: packed weights, scales,
//! biases and dequantized values identical bit for bit, for f32/f16/bf16 inputs and every
//! bits × group size MLX supports; and the float modes (mxfp4, nvfp4 with and without a global
//! scale, mxfp8) against their own goldens, with mlx's refusals of the combinations it does not
//! allow.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use wick::ops::qmatmul::dequantize_tensor;
use wick::quant::{fp, quantize_tensor, Mode, QuantParams};

fn bytes(t: &Tensor) -> Vec<u8> {
    let t = t.flatten_all().unwrap();
    match t.dtype() {
        DType::U8 => t.to_vec1::<u8>().unwrap(),
        DType::U32 => t.to_vec1::<u32>().unwrap().iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::F32 => t.to_vec1::<f32>().unwrap().iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::F16 => t.to_vec1::<half::f16>().unwrap().iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::BF16 => t.to_vec1::<half::bf16>().unwrap().iter().flat_map(|x| x.to_le_bytes()).collect(),
        d => panic!("{d:?}"),
    }
}

fn sha(t: &Tensor) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes(t)).iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn quantize_and_dequantize_are_bit_exact_with_mlx() {
    let g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden("quant_vectors.json")).unwrap()).unwrap();
    let inputs = candle_core::safetensors::load(golden("quant_inputs.safetensors"), &Device::Cpu).unwrap();
    let cases = g["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 3 * 2 * 6 * 3);
    let mut failures = vec![];
    for c in cases {
        let w = &inputs[c["input"].as_str().unwrap()];
        let p =
            QuantParams::new(c["bits"].as_u64().unwrap() as usize, c["group_size"].as_u64().unwrap() as usize, "test")
                .unwrap();
        let (q, s, b) = quantize_tensor(w, p).unwrap();
        let tag = format!("{} bits={} gs={}", c["input"], p.bits, p.group_size);
        let shape: Vec<usize> =
            c["packed_shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
        assert_eq!(q.dims(), shape.as_slice(), "{tag}: packed shape");
        for (what, t, key) in
            [("packed", &q, "packed_sha256"), ("scales", &s, "scales_sha256"), ("biases", &b, "biases_sha256")]
        {
            if sha(t) != c[key].as_str().unwrap() {
                failures.push(format!("{tag}: {what}"));
            }
        }
        let d = dequantize_tensor(&q, &s, &b, p).unwrap();
        assert_eq!(d.dtype(), w.dtype());
        if sha(&d) != c["dequantized_sha256"].as_str().unwrap() {
            failures.push(format!("{tag}: dequantized"));
        }
    }
    assert!(failures.is_empty(), "{} mismatches with mlx:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn float_modes_quantize_and_dequantize_bit_exact_with_mlx() {
    let g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden("quant_modes.json")).unwrap()).unwrap();
    let inputs = candle_core::safetensors::load(golden("quant_modes_inputs.safetensors"), &Device::Cpu).unwrap();
    let cases = g["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 3 * 2 * 4);
    let mut failures = vec![];
    for c in cases {
        let w = &inputs[c["input"].as_str().unwrap()];
        let name = c["mode"].as_str().unwrap();
        let mode = Mode::parse(name.split('_').next().unwrap()).unwrap();
        // mlx's own tests take the global scale as max|w| in f32
        let global = c.get("global_scale").map(|v| v.as_f64().unwrap() as f32);
        if let Some(gv) = global {
            let amax = w.to_dtype(DType::F32).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
            assert_eq!(amax.to_scalar::<f32>().unwrap(), gv);
        }
        let (q, s) = fp::quantize_tensor(w, mode, global).unwrap();
        let tag = format!("{} {name}", c["input"]);
        for (what, t, key) in [("packed", &q, "packed_sha256"), ("scales", &s, "scales_sha256")] {
            if sha(t) != c[key].as_str().unwrap() {
                failures.push(format!("{tag}: {what}"));
            }
        }
        for (odt, dtype) in [("float32", DType::F32), ("float16", DType::F16), ("bfloat16", DType::BF16)] {
            let d = fp::dequantize_tensor(&q, &s, mode, dtype, global.map(|g| vec![g]).as_deref()).unwrap();
            let want_dtype = c[format!("dequantized_{odt}_dtype")].as_str().unwrap().trim_start_matches("mlx.core.");
            assert_eq!(format!("{:?}", d.dtype()).to_lowercase(), want_dtype.replace("float", "f"));
            if sha(&d) != c[format!("dequantized_{odt}_sha256")].as_str().unwrap() {
                failures.push(format!("{tag}: dequantized to {odt}"));
            }
        }
    }
    assert!(failures.is_empty(), "{} mismatches with mlx:\n{}", failures.len(), failures.join("\n"));
}

/// Every mode × group size × bits mlx refuses, wick refuses with mlx's words; the ones it takes,
/// wick takes.
#[test]
fn float_modes_refuse_what_mlx_refuses_in_its_words() {
    let g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden("quant_modes.json")).unwrap()).unwrap();
    let refused: std::collections::HashMap<(String, u64, u64), String> = g["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let key = (
                e["mode"].as_str().unwrap().to_string(),
                e["group_size"].as_u64().unwrap(),
                e["bits"].as_u64().unwrap(),
            );
            (key, e["error"].as_str().unwrap().to_string())
        })
        .collect();
    for mode in Mode::ALL {
        for gs in [16u64, 32, 64, 128] {
            for bits in 2u64..=8 {
                let got = QuantParams::with_mode(mode, Some(gs as usize), Some(bits as usize), "--q-bits");
                match (refused.get(&(mode.name().to_string(), gs, bits)), got) {
                    (None, Ok(p)) => assert_eq!((p.mode, p.group_size, p.bits), (mode, gs as usize, bits as usize)),
                    (None, Err(e)) => panic!("{mode} gs {gs} bits {bits}: mlx takes it, wick refuses: {e}"),
                    (Some(want), Ok(_)) => panic!("{mode} gs {gs} bits {bits}: mlx refuses ({want}), wick takes it"),
                    // affine keeps wick's own (more specific) wording, naming the flag
                    (Some(_), Err(e)) if mode == Mode::Affine => assert!(e.to_string().contains("--q-bits"), "{e}"),
                    (Some(want), Err(e)) => assert_eq!(e.to_string(), format!("--q-bits: {want}")),
                }
            }
        }
    }
}
