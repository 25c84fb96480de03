//! `wick convert -q` against `mlx_lm.convert -q` on the default model: every tensor
//! byte-identical, the same quantization block; and greedy tokens on the 4- and 8-bit folders
//! identical to mlx_lm's on its folders (same bytes, so the same model); the same for
//! `--q-mode mxfp4 | nvfp4 | mxfp8`.

mod common;

use candle_core::{DType, Device};
use common::*;
use wick::convert::{convert, ConvertOptions, QuantizeOptions};
use wick::quant::{Mode, QuantParams};

fn goldens() -> serde_json::Value {
    read_golden("smollm2_quantized.json")
}

fn read_golden(file: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(golden(file)).unwrap()).unwrap()
}

fn options(args: &serde_json::Value) -> ConvertOptions {
    let bits = args.get("q_bits").and_then(|v| v.as_u64()).map(|b| b as usize);
    let gs = args.get("q_group_size").and_then(|v| v.as_u64()).map(|g| g as usize);
    let mode = Mode::parse(args.get("q_mode").and_then(|v| v.as_str()).unwrap_or("affine")).unwrap();
    ConvertOptions {
        dtype: args.get("dtype").and_then(|v| v.as_str()).map(|d| wick::backend::device::parse_dtype(d).unwrap()),
        quantize: Some(QuantizeOptions {
            params: QuantParams::with_mode(mode, gs, bits, "test").unwrap(),
            recipe: args.get("quant_predicate").and_then(|v| v.as_str()).map(String::from),
        }),
        ..Default::default()
    }
}

fn tensor_sha(t: &candle_core::Tensor) -> String {
    use sha2::Digest;
    let t = t.flatten_all().unwrap();
    let bytes: Vec<u8> = match t.dtype() {
        DType::U8 => t.to_vec1::<u8>().unwrap(),
        DType::U32 => t.to_vec1::<u32>().unwrap().iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::F32 => t.to_vec1::<f32>().unwrap().iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::F16 => t.to_vec1::<half::f16>().unwrap().iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::BF16 => t.to_vec1::<half::bf16>().unwrap().iter().flat_map(|x| x.to_le_bytes()).collect(),
        d => panic!("{d:?}"),
    };
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn convert_like_mlx(g: &serde_json::Value, name: &str, tmp: &std::path::Path) -> std::path::PathBuf {
    let out = tmp.join(name);
    convert(&default_model(), &out, &options(&g[name]["convert_args"])).unwrap();
    out
}

#[test]
fn convert_q_output_is_byte_identical_to_mlx_lm() {
    check_conversions(&goldens());
}

/// `--q-mode mxfp4 | nvfp4 | mxfp8` of the default model: byte-identical with mlx_lm.convert, and
/// mlx_lm's greedy tokens on its folders.
#[test]
fn float_mode_conversions_match_mlx_lm() {
    let g = read_golden("smollm2_quantized_modes.json");
    check_conversions(&g);
    check_greedy(&g, &["mxfp4", "nvfp4", "mxfp8"]);
}

fn check_conversions(g: &serde_json::Value) {
    let tmp = tempfile::tempdir().unwrap();
    for (name, want) in g.as_object().unwrap() {
        let out = convert_like_mlx(g, name, tmp.path());
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["quantization"], want["quantization"], "{name}: quantization block");
        assert_eq!(cfg["quantization_config"], want["quantization_config"], "{name}: quantization_config block");
        let w = wick::io::Weights::open(&out).unwrap();
        let tensors = want["tensors"].as_object().unwrap();
        assert_eq!(w.names().count(), tensors.len(), "{name}: tensor count");
        let mut bad = vec![];
        for (t, info) in tensors {
            let x = w.raw(t, &Device::Cpu).unwrap();
            let shape: Vec<usize> =
                info["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
            assert_eq!(x.dims(), shape.as_slice(), "{name}: {t} shape");
            if tensor_sha(&x) != info["sha256"].as_str().unwrap() {
                bad.push(t.clone());
            }
        }
        assert!(bad.is_empty(), "{name}: {} tensors differ from mlx_lm's: {:?}", bad.len(), &bad[..bad.len().min(8)]);
    }
}

#[test]
fn greedy_tokens_on_4_and_8_bit_match_mlx_lm() {
    check_greedy(&goldens(), &["q4g64", "q8g64"]);
}

fn check_greedy(g: &serde_json::Value, names: &[&str]) {
    let prompts: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden("smollm2_greedy.json")).unwrap()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for &name in names {
        let out = convert_like_mlx(g, name, tmp.path());
        let m = wick::engine::load_model(&out, Some(DType::F32), &Device::Cpu).unwrap();
        let model = m.model.as_ref();
        for (i, c) in prompts["cases"].as_array().unwrap().iter().enumerate() {
            let ids: Vec<u32> =
                c["prompt_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
            let want: Vec<u32> =
                g[name]["greedy_f32"][i].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
            let mut cache = model.make_cache(None);
            let mut l = wick::engine::generate::prefill(model, &ids, &mut cache, 2048).unwrap();
            let mut got = vec![];
            for _ in 0..want.len() {
                let t = wick::engine::sample::argmax(&l);
                got.push(t);
                l = wick::engine::generate::step_logits(model, &[t], &mut cache).unwrap();
            }
            assert_eq!(got, want, "{name} case {i}: greedy tokens differ from mlx_lm");
        }
    }
}
