//! wick's own Metal kernels (the `metal` feature): their Metal Shading Language source is
//! embedded in the binary and compiled by Metal at run time, once per device, into a library;
//! each kernel's compute pipeline is built on first use and cached. Nothing here has run on this
//! project's machines (there is no Mac): it is type-checked for aarch64-apple-darwin only
//! (docs/metal.md).

use candle_core::{MetalDevice, Result};
use candle_metal_kernels::metal::{ComputePipeline, Library};
use std::collections::HashMap;
use std::sync::Mutex;

/// An MSL program wick compiles into one library: the op that owns the kernels names it and
/// gives its full text (Metal's standard library, shared headers, then the kernels: sources given
/// to Metal as a string cannot `#include` files).
#[derive(Debug, Clone, Copy)]
pub struct Source {
    pub name: &'static str,
    pub text: fn() -> String,
}

struct Compiled {
    device: u64,
    source: &'static str,
    library: Library,
    pipelines: HashMap<String, ComputePipeline>,
}

static COMPILED: Mutex<Vec<Compiled>> = Mutex::new(Vec::new());

fn metal_error(what: String) -> candle_core::Error {
    candle_core::Error::Msg(what)
}

/// Compile options: no fast math, so that `a * b + c` written as two rounded steps (the
/// dequantization, which must round as MLX does) is never fused.
fn compile_options() -> objc2::rc::Retained<objc2_metal::MTLCompileOptions> {
    use objc2_metal::{MTLCompileOptions, MTLMathFloatingPointFunctions, MTLMathMode};
    let options = MTLCompileOptions::new();
    if objc2::available!(macos = 15, ios = 18) {
        options.setMathMode(MTLMathMode::Safe);
        options.setMathFloatingPointFunctions(MTLMathFloatingPointFunctions::Precise);
    } else {
        #[allow(deprecated)]
        options.setFastMathEnabled(false);
    }
    options
}

/// The compute pipeline of kernel `name` of `source` on `dev`, compiling the source on first use.
pub fn pipeline(dev: &MetalDevice, source: Source, name: &str) -> Result<ComputePipeline> {
    let device = dev.device();
    let id = device.registry_id();
    let mut compiled = COMPILED.lock().unwrap_or_else(|e| e.into_inner());
    let i = match compiled.iter().position(|c| c.device == id && c.source == source.name) {
        Some(i) => i,
        None => {
            let options = compile_options();
            let library = device.new_library_with_source(&(source.text)(), Some(&options)).map_err(|e| {
                metal_error(format!(
                    "compiling wick's Metal kernels ({}) failed: {e} — please report this with your macOS version and Mac model",
                    source.name
                ))
            })?;
            compiled.push(Compiled { device: id, source: source.name, library, pipelines: HashMap::new() });
            compiled.len() - 1
        }
    };
    let c = &mut compiled[i];
    if let Some(p) = c.pipelines.get(name) {
        return Ok(p.clone());
    }
    let function = c.library.get_function(name, None).map_err(|e| {
        let hint = if name.contains("_bf16_") { " (bfloat16 kernels need Metal 3.1: macOS 14 or newer)" } else { "" };
        metal_error(format!("Metal kernel {name} is not available: {e}{hint}"))
    })?;
    let p = device
        .new_compute_pipeline_state_with_function(&function)
        .map_err(|e| metal_error(format!("building the Metal pipeline of {name}: {e}")))?;
    c.pipelines.insert(name.to_string(), p.clone());
    Ok(p)
}

/// MSL's name of an activation dtype, as the kernels' names spell it.
pub fn dtype_suffix(d: candle_core::DType, what: &str) -> Result<&'static str> {
    Ok(match d {
        candle_core::DType::F32 => "f32",
        candle_core::DType::F16 => "f16",
        candle_core::DType::BF16 => "bf16",
        other => candle_core::bail!("{what} on Metal: dtype {other:?} is not supported (f32, f16, bf16 are)"),
    })
}
