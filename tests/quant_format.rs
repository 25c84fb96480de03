//! The affine format against mx.quantize / mx.dequantize goldens: packed weights, scales,
//! biases and dequantized values identical bit for bit, for f32/f16/bf16 inputs and every
//! bits × group size MLX supports.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use wick::ops::qmatmul::dequantize_tensor;
use wick::quant::{quantize_tensor, QuantParams};

fn bytes(t: &Tensor) -> Vec<u8> {
    let t = t.flatten_all().unwrap();
    match t.dtype() {
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
