//! CUDA graphs: capture a stretch of work enqueued on the device's stream and replay it as one
//! launch (the denoising step, `pipeline::graphs`; the VAE's decode passes, `model::vae`). What
//! makes work capturable: docs/cuda-graphs.md.

pub use imp::{graph_memory_mib, warm_run, Graph};

#[cfg(feature = "cuda")]
mod imp {
    use anyhow::Context;
    use candle_core::cuda_backend::cudarc::driver::{sys, CudaGraph};
    use candle_core::Device;

    /// A captured stretch of device work (a denoising step, a VAE decode pass).
    pub struct Graph {
        graph: CudaGraph,
        /// Its node count: kernels, copies, memsets and memory nodes.
        nodes: usize,
    }

    // SAFETY: cudarc leaves CudaGraph !Send because graph objects are not internally
    // synchronised; this one is only ever used by the engine owning its `StepGraphs`,
    // through `&mut`, one call at a time.
    unsafe impl Send for Graph {}

    /// Runs `body` with candle's cache of small host-to-device uploads (kernel shapes and
    /// strides) filling, so that capturing the same work finds them all on the device.
    pub fn warm_run(
        device: &Device,
        body: impl FnOnce() -> candle_core::Result<()>,
    ) -> anyhow::Result<()> {
        let _cache = device.as_cuda_device()?.enable_cuda_graph_htod_cache();
        Ok(body()?)
    }

    impl Graph {
        /// Captures `body` on the device's stream (thread-local mode: other threads' CUDA
        /// calls are unaffected) and instantiates it. Memory allocated inside is graph-owned;
        /// what is left unfreed at the end (none of ours) is freed at the next launch.
        pub fn capture(
            device: &Device,
            body: impl FnOnce() -> candle_core::Result<()>,
        ) -> anyhow::Result<Self> {
            let dev = device.as_cuda_device()?;
            let stream = dev.cuda_stream();
            let _cache = dev.enable_cuda_graph_htod_cache();
            stream
                .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                .context("starting the capture")?;
            let ran = body();
            let graph = stream.end_capture(
                sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH,
            );
            if ran.is_err() || graph.is_err() {
                // An invalidated capture leaves an error recorded by the frees inside it.
                let _ = stream.context().check_err();
            }
            ran.context("recording the captured work")?;
            let graph = graph
                .context("ending the capture")?
                .context("the capture recorded nothing")?;
            graph.upload().context("uploading the graph")?;
            let mut nodes = 0usize;
            // SAFETY: a live graph; with a null array the call only writes the count.
            let _ =
                unsafe { sys::cuGraphGetNodes(graph.cu_graph(), std::ptr::null_mut(), &mut nodes) };
            Ok(Self { graph, nodes })
        }

        pub fn launch(&self) -> anyhow::Result<()> {
            Ok(self.graph.launch()?)
        }

        pub fn nodes(&self) -> usize {
            self.nodes
        }
    }

    /// The device's graph memory reserved so far (all graphs), MiB.
    pub fn graph_memory_mib(device: &Device) -> Option<u64> {
        let dev = device.as_cuda_device().ok()?;
        let mut bytes = 0u64;
        // SAFETY: a valid device handle and a u64 out-value, as the attribute documents.
        let status = unsafe {
            sys::cuDeviceGetGraphMemAttribute(
                dev.cuda_stream().context().cu_device(),
                sys::CUgraphMem_attribute::CU_GRAPH_MEM_ATTR_RESERVED_MEM_HIGH,
                (&mut bytes) as *mut u64 as *mut _,
            )
        };
        (status == sys::CUresult::CUDA_SUCCESS).then_some(bytes >> 20)
    }
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use candle_core::Device;

    /// Never made: without CUDA nothing is captured.
    pub enum Graph {}

    impl Graph {
        pub fn nodes(&self) -> usize {
            match *self {}
        }

        pub fn capture(
            _: &Device,
            _: impl FnOnce() -> candle_core::Result<()>,
        ) -> anyhow::Result<Self> {
            anyhow::bail!("CUDA graphs need a build with the cuda feature")
        }

        pub fn launch(&self) -> anyhow::Result<()> {
            match *self {}
        }
    }

    pub fn warm_run(
        _: &Device,
        body: impl FnOnce() -> candle_core::Result<()>,
    ) -> anyhow::Result<()> {
        Ok(body()?)
    }

    pub fn graph_memory_mib(_: &Device) -> Option<u64> {
        None
    }
}
