//! Launches of wick's own kernels through `cuLaunchKernelEx`, with programmatic dependent
//! launch on GPUs of compute capability 9.0 and newer (Hopper).
//!
//! A kernel launched so may start while the kernel ahead of it in the stream is still running:
//! its blocks are scheduled as soon as every block of the kernel ahead has executed
//! `griddepcontrol.launch_dependents` (each of wick's kernels does so first thing) and SMs have
//! room, and they read nothing another kernel writes, and write nothing, before
//! `griddepcontrol.wait` (which returns once the kernel ahead has finished and its writes are
//! visible). The quantized matmuls issue their first weights' loads before waiting, so the
//! next layer's weights stream while the previous kernel drains, and every launch's ramp hides
//! behind the kernel ahead. The rule the kernels keep (`pdl_wait` in src/backend/cuda/common.cuh):
//! before the wait only weights (packed codes, scales, biases, norm weights) are read, which no
//! kernel of an inference step writes. One exception: a replayed decode step's attention
//! (`wick_attention_step_*`) also reads the cache rows of earlier positions and the step's
//! position copies before its wait; earlier steps wrote those, and a step begins behind its
//! copies (full dependencies), so nothing still running writes them.
//!
//! In a captured decode step (a CUDA graph, [`StepGraph`]) a programmatic launch becomes a
//! programmatic edge only where the node before it is a kernel, but most of wick's kernels
//! follow the allocation of their output or a free (stream-ordered allocation: memory nodes),
//! and the driver lets no edge of a graph with memory nodes be removed. So the capture is
//! rebuilt without them before it is instantiated ([`rebuild`]): the same kernels and copies
//! in a new graph, their intermediates in one buffer the graph owns.
//!
//! `WICK_CUDA_PDL=0` launches them as plain launches (the waits then return at once) and keeps
//! captures as they are.

use candle_core::cuda_backend::cudarc::driver::{
    sys, CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DriverError, LaunchConfig, SyncOnDrop,
};
use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock};

/// The handles of wick's own kernels (all wait before they read an earlier kernel's output):
/// only they may follow a programmatic edge.
static OURS: Mutex<Option<HashSet<usize>>> = Mutex::new(None);

/// Records a kernel of wick's own (see [`OURS`]).
pub(super) fn register(f: &CudaFunction) {
    let mut ours = OURS.lock().unwrap_or_else(|e| e.into_inner());
    ours.get_or_insert_with(HashSet::new).insert(f.cu_function() as usize);
}

fn is_ours(f: sys::CUfunction) -> bool {
    let ours = OURS.lock().unwrap_or_else(|e| e.into_inner());
    ours.as_ref().is_some_and(|o| o.contains(&(f as usize)))
}

/// One kernel launch's arguments, gathered as candle's `LaunchArgs` gathers them.
pub struct Launch<'a> {
    stream: &'a CudaStream,
    func: &'a CudaFunction,
    /// each argument's value (device addresses, scalars in their low bytes: little-endian)
    values: Vec<u64>,
    /// the buffers' read records, kept until the launch (cudarc's stream tracking)
    guards: Vec<SyncOnDrop<'a>>,
}

/// Something a kernel takes as an argument.
pub trait KernelArg {
    fn push<'a>(&'a self, launch: &mut Launch<'a>);
}

macro_rules! scalar_arg {
    ($($t:ty),*) => {$(
        impl KernelArg for $t {
            fn push<'a>(&'a self, launch: &mut Launch<'a>) {
                let mut bytes = [0u8; 8];
                let v = self.to_le_bytes();
                bytes[..v.len()].copy_from_slice(&v);
                launch.values.push(u64::from_le_bytes(bytes));
            }
        }
    )*};
}
scalar_arg!(i32, u32, i64, u64, f32);

macro_rules! buffer_arg {
    ($($t:ty),*) => {$(
        impl<T> KernelArg for $t {
            fn push<'a>(&'a self, launch: &mut Launch<'a>) {
                let (ptr, guard) = self.device_ptr(launch.stream);
                launch.values.push(ptr);
                launch.guards.push(guard);
            }
        }
    )*};
}
buffer_arg!(CudaSlice<T>, CudaView<'_, T>, CudaViewMut<'_, T>);

impl<'a> Launch<'a> {
    pub fn new(stream: &'a CudaStream, func: &'a CudaFunction) -> Self {
        Self { stream, func, values: Vec::with_capacity(24), guards: Vec::new() }
    }

    /// Appends the next argument.
    pub fn arg<A: KernelArg + ?Sized>(&mut self, a: &'a A) -> &mut Self {
        a.push(self);
        self
    }

    /// Queues the kernel on the stream (consuming the arguments).
    ///
    /// # Safety
    /// The arguments must be the kernel's parameters, in order and of its types (as with
    /// cudarc's `LaunchArgs::launch`), and the kernel must keep the rule in the module's
    /// documentation: nothing read that another kernel writes, and nothing written, before
    /// `griddepcontrol.wait`.
    pub unsafe fn launch(mut self, cfg: LaunchConfig) -> Result<(), DriverError> {
        self.stream.context().bind_to_thread()?;
        let mut params: Vec<*mut std::ffi::c_void> =
            self.values.iter_mut().map(|v| v as *mut u64 as *mut std::ffi::c_void).collect();
        let mut attr: sys::CUlaunchAttribute = std::mem::zeroed();
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let programmatic = enabled(self.stream);
        let config = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.stream.cu_stream(),
            attrs: if programmatic { &mut attr } else { std::ptr::null_mut() },
            numAttrs: programmatic as u32,
        };
        let r = sys::cuLaunchKernelEx(&config, self.func.cu_function(), params.as_mut_ptr(), std::ptr::null_mut());
        drop(self.guards); // records the reads after the launch
        r.result()
    }
}

/// Whether wick's kernels on `dev` are launched programmatically (and decode steps' graphs
/// rebuilt for it): compute capability 9.0 or newer, `WICK_CUDA_PDL` not `0`.
pub fn programmatic_launches(dev: &candle_core::Device) -> candle_core::Result<bool> {
    Ok(enabled(&dev.as_cuda_device()?.cuda_stream()))
}

/// Whether launches on this stream's device are programmatic: compute capability 9.0 or newer
/// and `WICK_CUDA_PDL` not `0` (asked once per device).
fn enabled(stream: &CudaStream) -> bool {
    const DEVICES: usize = 64;
    static PER_DEVICE: [OnceLock<bool>; DEVICES] = [const { OnceLock::new() }; DEVICES];
    let ctx = stream.context();
    let Some(cell) = PER_DEVICE.get(ctx.ordinal()) else {
        return false;
    };
    *cell.get_or_init(|| {
        let major = ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR).unwrap_or(0);
        major >= 9 && std::env::var("WICK_CUDA_PDL").map_or(true, |v| v != "0")
    })
}

/// A captured decode step, instantiated: cudarc's `CudaGraph`, except that where programmatic
/// launches are on the capture is rebuilt for them first ([`rebuild`]).
pub struct StepGraph {
    graph: sys::CUgraph,
    exec: sys::CUgraphExec,
    stream: Arc<CudaStream>,
    /// the rebuilt graph's intermediates (None: the capture as it is, with its own memory)
    _arena: Option<CudaSlice<u8>>,
}

// The handles are only used through the driver, which is thread-safe; launches go to the stream.
unsafe impl Send for StepGraph {}
unsafe impl Sync for StepGraph {}

impl StepGraph {
    /// Ends the stream's capture and instantiates what it captured (None: nothing was). When
    /// programmatic launches are on, the rebuilt graph is instantiated if the capture can be
    /// rebuilt, else the capture as it is; `debug` reports which. `previous`: the same step's
    /// last graph (captured on other buffers), whose instance takes the new graph's parameters
    /// where the two have the same shape, a cheaper update than an instantiation (launches of
    /// it already queued run as they were).
    pub fn end_capture(
        stream: &Arc<CudaStream>,
        debug: bool,
        mut previous: Option<StepGraph>,
    ) -> Result<Option<Self>, DriverError> {
        stream.context().bind_to_thread()?;
        let mut graph = std::ptr::null_mut();
        unsafe { sys::cuStreamEndCapture(stream.cu_stream(), &mut graph) }.result()?;
        if graph.is_null() {
            return Ok(None);
        }
        if enabled(stream) {
            let start = std::time::Instant::now();
            match unsafe { rebuild(graph, stream) } {
                Ok(Ok((copy, arena, report))) => match unsafe { Self::instance(copy, arena, stream, &mut previous) } {
                    Ok(step) => {
                        if debug {
                            eprintln!("wick: decode step graph rebuilt: {report}; {} µs", start.elapsed().as_micros());
                        }
                        unsafe { sys::cuGraphDestroy(graph) };
                        crate::backend::stats::count(crate::backend::stats::Counter::GraphsRebuilt);
                        return Ok(Some(step));
                    }
                    Err(e) => {
                        if debug {
                            eprintln!(
                                "wick: the rebuilt decode step graph did not instantiate ({e:?}); kept as captured"
                            );
                        }
                    }
                },
                Ok(Err(why)) if debug => eprintln!("wick: decode step graph kept as captured: {why}"),
                Err(e) if debug => eprintln!("wick: rebuilding the decode step graph failed ({e:?}); kept as captured"),
                _ => {}
            }
        }
        unsafe { Self::instance(graph, None, stream, &mut previous) }.map(Some)
    }

    /// `graph` (owned: destroyed on failure) with its arena, instantiated, or updating the
    /// instance of `previous` (taken) where the driver accepts its parameters.
    unsafe fn instance(
        graph: sys::CUgraph,
        arena: Option<CudaSlice<u8>>,
        stream: &Arc<CudaStream>,
        previous: &mut Option<StepGraph>,
    ) -> Result<Self, DriverError> {
        if let Some(mut p) = previous.take() {
            let mut info: sys::CUgraphExecUpdateResultInfo = std::mem::zeroed();
            if sys::cuGraphExecUpdate_v2(p.exec, graph, &mut info).result().is_ok() {
                crate::backend::stats::count(crate::backend::stats::Counter::GraphsUpdated);
                // the old graph goes; its arena is freed in stream order, after the launches
                // queued that use it
                sys::cuGraphDestroy(std::mem::replace(&mut p.graph, graph));
                p._arena = arena;
                return Ok(p);
            }
            // refused (another shape): the previous instance goes
        }
        match instantiate(graph) {
            Ok(exec) => Ok(Self { graph, exec, stream: stream.clone(), _arena: arena }),
            Err(e) => {
                sys::cuGraphDestroy(graph);
                Err(e)
            }
        }
    }

    /// Queues a replay on the stream.
    pub fn launch(&self) -> Result<(), DriverError> {
        self.stream.context().bind_to_thread()?;
        unsafe { sys::cuGraphLaunch(self.exec, self.stream.cu_stream()) }.result()
    }
}

impl Drop for StepGraph {
    fn drop(&mut self) {
        // errors cannot be reported from here; a failed destroy leaks the graph
        let _ = self.stream.context().bind_to_thread();
        unsafe {
            sys::cuGraphExecDestroy(self.exec);
            sys::cuGraphDestroy(self.graph);
        }
    }
}

unsafe fn instantiate(graph: sys::CUgraph) -> Result<sys::CUgraphExec, DriverError> {
    let mut exec = std::ptr::null_mut();
    sys::cuGraphInstantiateWithFlags(&mut exec, graph, 0).result()?;
    Ok(exec)
}

/// A node of the captured chain, as the rebuild takes it.
enum Node {
    /// a kernel: its parameters' bytes, whether it is one of wick's (it may then follow a
    /// programmatic edge) and the captured node (for its attributes)
    Kernel {
        params: sys::CUDA_KERNEL_NODE_PARAMS,
        args: Vec<Vec<u8>>,
        ours: bool,
        node: sys::CUgraphNode,
    },
    Copy(sys::CUDA_MEMCPY3D),
    Set(sys::CUDA_MEMSET_NODE_PARAMS),
    /// an allocation: its address in the capture and its size
    Alloc(u64, usize),
    Free(u64),
}

/// Why a capture is kept as it is.
type Keep = String;
/// A rebuilt graph, its arena and a report of what it holds.
type Rebuilt = (sys::CUgraph, Option<CudaSlice<u8>>, String);

/// The capture `graph` (one stream: a chain of nodes) rebuilt without memory nodes: the same
/// kernels, copies and memsets in the same order, each kernel of wick's after a kernel through
/// a programmatic edge, every other pair through a full one; each allocation of the capture
/// becomes a range of one buffer (the arena, returned with the graph), placed as the
/// capture's frees and allocations come in stream order, so a range is reused only by work
/// after the last user of what it held (which has finished by then: every node after it
/// waits for it, fully or, being one of wick's kernels, before it touches any buffer), and
/// the kernels' and copies' addresses are moved into it. An address of the capture is found
/// among the allocations live at that node (the driver may give two allocations whose
/// lifetimes do not overlap the same address). `Ok(Err(why))`: the capture is not one that
/// this handles (another node type, a free of memory from outside, memory that outlives the
/// step, kernels launched with `extra`), and is kept.
unsafe fn rebuild(graph: sys::CUgraph, stream: &Arc<CudaStream>) -> Result<Result<Rebuilt, Keep>, DriverError> {
    let chain = match chain(graph)? {
        Ok(c) => c,
        Err(why) => return Ok(Err(why)),
    };
    let mut nodes = Vec::with_capacity(chain.len());
    for &node in &chain {
        let mut ty = sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_EMPTY;
        sys::cuGraphNodeGetType(node, &mut ty).result()?;
        nodes.push(match ty {
            sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_KERNEL => {
                let mut p: sys::CUDA_KERNEL_NODE_PARAMS = std::mem::zeroed();
                sys::cuGraphKernelNodeGetParams_v2(node, &mut p).result()?;
                if p.func.is_null() || !p.extra.is_null() {
                    return Ok(Err("a kernel without a function handle or with `extra` parameters".into()));
                }
                let mut args = Vec::new();
                loop {
                    let (mut offset, mut size) = (0usize, 0usize);
                    if sys::cuFuncGetParamInfo(p.func, args.len(), &mut offset, &mut size).result().is_err() {
                        break;
                    }
                    let at = *p.kernelParams.add(args.len()) as *const u8;
                    args.push(std::slice::from_raw_parts(at, size).to_vec());
                }
                Node::Kernel { params: p, args, ours: is_ours(p.func), node }
            }
            sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEMCPY => {
                // its memory-type fields have no zero value: filled by the driver before it is read
                let mut p = std::mem::MaybeUninit::<sys::CUDA_MEMCPY3D>::zeroed();
                sys::cuGraphMemcpyNodeGetParams(node, p.as_mut_ptr()).result()?;
                Node::Copy(p.assume_init())
            }
            sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEMSET => {
                let mut p: sys::CUDA_MEMSET_NODE_PARAMS = std::mem::zeroed();
                sys::cuGraphMemsetNodeGetParams(node, &mut p).result()?;
                Node::Set(p)
            }
            sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEM_ALLOC => {
                let mut p: sys::CUDA_MEM_ALLOC_NODE_PARAMS = std::mem::zeroed();
                sys::cuGraphMemAllocNodeGetParams(node, &mut p).result()?;
                Node::Alloc(p.dptr, p.bytesize)
            }
            sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEM_FREE => {
                let mut d = 0u64;
                sys::cuGraphMemFreeNodeGetParams(node, &mut d).result()?;
                Node::Free(d)
            }
            sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_EMPTY => continue,
            t => return Ok(Err(format!("a node of type {t:?}"))),
        });
    }
    // the arena's ranges, in stream order
    let mut arena = Arena::default();
    let mut allocations = 0;
    let mut live: Vec<(u64, usize, usize)> = Vec::new(); // (captured address, size, offset)
    let mut moves: Vec<Vec<(u64, usize, usize)>> = Vec::with_capacity(nodes.len()); // live ranges per node
    for n in &nodes {
        match *n {
            Node::Alloc(dptr, size) => {
                let at = arena.take(size);
                allocations += 1;
                live.push((dptr, size, at));
            }
            Node::Free(dptr) => {
                let Some(i) = live.iter().position(|l| l.0 == dptr) else {
                    return Ok(Err("a free of memory allocated outside the step".into()));
                };
                let (_, size, at) = live.swap_remove(i);
                arena.give(at, size);
            }
            _ => {}
        }
        moves.push(live.clone());
    }
    if !live.is_empty() {
        return Ok(Err(format!("{} allocations outlive the step", live.len())));
    }
    let buffer = if arena.high > 0 { Some(stream.alloc::<u8>(arena.high)?) } else { None };
    let base = match &buffer {
        Some(b) => b.device_ptr(stream).0,
        None => 0,
    };
    // an address of the capture, moved into the arena (others are left as they are)
    let moved = |v: u64, live: &[(u64, usize, usize)]| {
        live.iter().find(|l| v >= l.0 && v < l.0 + l.1 as u64).map_or(v, |l| base + l.2 as u64 + (v - l.0))
    };
    let mut out = std::ptr::null_mut();
    sys::cuGraphCreate(&mut out, 0).result()?;
    let built = (|| -> Result<String, DriverError> {
        let ctx = stream.context().cu_ctx();
        let (mut prev, mut prev_kernel) = (None::<sys::CUgraphNode>, false);
        let (mut kernels, mut ours_n, mut programmatic, mut others) = (0, 0, 0, 0);
        for (n, live) in nodes.iter().zip(&moves) {
            let mut node = std::ptr::null_mut();
            let (kernel, ours) = match n {
                Node::Kernel { params, args, ours, node: captured } => {
                    let mut args = args.clone();
                    for a in args.iter_mut() {
                        for w in a.chunks_exact_mut(8) {
                            let v = u64::from_le_bytes(w.try_into().expect("8 bytes"));
                            w.copy_from_slice(&moved(v, live).to_le_bytes());
                        }
                    }
                    let mut ptrs: Vec<*mut std::ffi::c_void> =
                        args.iter_mut().map(|a| a.as_mut_ptr() as *mut std::ffi::c_void).collect();
                    let mut p = *params;
                    p.kernelParams = ptrs.as_mut_ptr();
                    sys::cuGraphAddKernelNode_v2(&mut node, out, std::ptr::null(), 0, &p).result()?;
                    sys::cuGraphKernelNodeCopyAttributes(node, *captured).result()?;
                    kernels += 1;
                    ours_n += *ours as usize;
                    (true, *ours)
                }
                Node::Copy(p) => {
                    let mut p = *p;
                    p.srcDevice = moved(p.srcDevice, live);
                    p.dstDevice = moved(p.dstDevice, live);
                    sys::cuGraphAddMemcpyNode(&mut node, out, std::ptr::null(), 0, &p, ctx).result()?;
                    others += 1;
                    (false, false)
                }
                Node::Set(p) => {
                    let mut p = *p;
                    p.dst = moved(p.dst, live);
                    sys::cuGraphAddMemsetNode(&mut node, out, std::ptr::null(), 0, &p, ctx).result()?;
                    others += 1;
                    (false, false)
                }
                Node::Alloc(..) | Node::Free(_) => continue,
            };
            if let Some(from) = prev {
                let mut d: sys::CUgraphEdgeData = std::mem::zeroed();
                if prev_kernel && ours {
                    d.from_port = sys::CU_GRAPH_KERNEL_NODE_PORT_PROGRAMMATIC as u8;
                    d.type_ = sys::CUgraphDependencyType::CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC as u8;
                    programmatic += 1;
                }
                sys::cuGraphAddDependencies_v2(out, &from, &node, &d, 1).result()?;
            }
            prev = Some(node);
            prev_kernel = kernel;
        }
        Ok(format!(
            "{kernels} kernels ({ours_n} wick's), {others} copies/memsets, {programmatic} programmatic edges, {allocations} allocations in {} bytes",
            arena.high
        ))
    })();
    match built {
        Ok(report) => Ok(Ok((out, buffer, report))),
        Err(e) => {
            sys::cuGraphDestroy(out);
            Err(e)
        }
    }
}

/// The nodes of a one-stream capture in order, or why it is not one chain.
unsafe fn chain(graph: sys::CUgraph) -> Result<Result<Vec<sys::CUgraphNode>, Keep>, DriverError> {
    let mut n = 0usize;
    sys::cuGraphGetNodes(graph, std::ptr::null_mut(), &mut n).result()?;
    let mut nodes = vec![std::ptr::null_mut(); n];
    sys::cuGraphGetNodes(graph, nodes.as_mut_ptr(), &mut n).result()?;
    let mut e = 0usize;
    let null = std::ptr::null_mut();
    sys::cuGraphGetEdges_v2(graph, null, null, std::ptr::null_mut(), &mut e).result()?;
    let (mut from, mut to) = (vec![std::ptr::null_mut(); e], vec![std::ptr::null_mut(); e]);
    // (edges from programmatic launches carry data: a query without it would be refused)
    let mut data: Vec<sys::CUgraphEdgeData> = vec![std::mem::zeroed(); e];
    sys::cuGraphGetEdges_v2(graph, from.as_mut_ptr(), to.as_mut_ptr(), data.as_mut_ptr(), &mut e).result()?;
    let index: std::collections::HashMap<usize, usize> =
        nodes.iter().enumerate().map(|(i, &p)| (p as usize, i)).collect();
    let (mut next, mut has_in) = (vec![None; n], vec![false; n]);
    for (&f, &t) in from.iter().zip(&to) {
        let (Some(&f), Some(&t)) = (index.get(&(f as usize)), index.get(&(t as usize))) else {
            return Ok(Err("an edge to an unknown node".into()));
        };
        if next[f].is_some() || has_in[t] {
            return Ok(Err("not one chain".into()));
        }
        next[f] = Some(t);
        has_in[t] = true;
    }
    let mut roots = (0..n).filter(|&i| !has_in[i]);
    let (Some(root), None) = (roots.next(), roots.next()) else {
        return Ok(Err("not one chain".into()));
    };
    let mut order = vec![root];
    while let Some(t) = next[*order.last().expect("not empty")] {
        order.push(t);
    }
    if order.len() != n {
        return Ok(Err("not one chain".into()));
    }
    Ok(Ok(order.into_iter().map(|i| nodes[i]).collect()))
}

/// Ranges of one buffer handed out and back in stream order (first fit, 256-byte aligned,
/// neighbours merged); `high` is the buffer's size so far.
#[derive(Default)]
struct Arena {
    /// (offset, size), by offset
    free: Vec<(usize, usize)>,
    high: usize,
}

impl Arena {
    const ALIGN: usize = 256;

    fn take(&mut self, size: usize) -> usize {
        let size = size.max(1).next_multiple_of(Self::ALIGN);
        if let Some(i) = self.free.iter().position(|f| f.1 >= size) {
            let (at, have) = self.free[i];
            if have == size {
                self.free.remove(i);
            } else {
                self.free[i] = (at + size, have - size);
            }
            return at;
        }
        // the last free range, if it ends the buffer, grows
        if let Some(&(at, have)) = self.free.last() {
            if at + have == self.high {
                self.free.pop();
                self.high = at + size;
                return at;
            }
        }
        self.high += size;
        self.high - size
    }

    fn give(&mut self, at: usize, size: usize) {
        let size = size.max(1).next_multiple_of(Self::ALIGN);
        let i = self.free.partition_point(|f| f.0 < at);
        self.free.insert(i, (at, size));
        if i + 1 < self.free.len() && self.free[i].0 + self.free[i].1 == self.free[i + 1].0 {
            self.free[i].1 += self.free[i + 1].1;
            self.free.remove(i + 1);
        }
        if i > 0 && self.free[i - 1].0 + self.free[i - 1].1 == self.free[i].0 {
            self.free[i - 1].1 += self.free[i].1;
            self.free.remove(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Arena;

    #[test]
    fn arena_reuses_what_came_back_and_grows_only_when_nothing_fits() {
        let mut a = Arena::default();
        let x = a.take(100); // 256
        let y = a.take(300); // 512
        let z = a.take(256);
        assert_eq!((x, y, z, a.high), (0, 256, 768, 1024));
        a.give(y, 300);
        assert_eq!(a.take(200), 256); // first fit inside y's range
        assert_eq!(a.take(256), 512); // the rest of it
        a.give(x, 100);
        a.give(z, 256);
        // nothing fits 1,024 bytes: z's range, which ends the buffer, grows
        assert_eq!(a.take(1000), 768);
        assert_eq!(a.high, 1792);
        a.give(256, 200);
        a.give(512, 256);
        // x and y's two parts merged back into one range
        assert_eq!(a.free, vec![(0, 768)]);
        assert_eq!(a.take(768), 0);
    }
}
