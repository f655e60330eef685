//! The emulated device: one launch through the harness (`emulate`, `run_staged`), the two-slot
//! device of the GPU path's pipeline (`Emu`), and a whole pipeline against the CPU merge.

use super::*;

/// Runs one launch of `job` through the emulated kernel: (status words, output bytes).
pub fn emulate(h: &Path, l: &Launch, deltas: &[Input], job: &Job) -> ([u64; 2], Vec<u8>) {
    // Stage exactly as the GPU path does, then run the staged buffer.
    let lay = cuda::Layout::of(l, job.from, job.to);
    let mut buf = vec![0u8; lay.input_end];
    cuda::stage(l, deltas, job.terms, job.name, job.base, job.from, &mut buf).unwrap();
    let out = run_staged(h, &buf, &lay, l, job);
    let status = [
        u64::from_le_bytes(out[0..8].try_into().unwrap()),
        u64::from_le_bytes(out[8..16].try_into().unwrap()),
    ];
    (status, out[16..].to_vec())
}

/// The host emulation as the pipeline's device: each slot's staged slice is run through the
/// harness when started, its result kept in the slot's output staging until finished.
pub struct Emu<'a> {
    h: &'a Path,
    jobs: &'a [Job<'a>],
    input: [Vec<u8>; 2],
    output: [Vec<u8>; 2],
    busy: [bool; 2],
}

impl<'a> Emu<'a> {
    /// The two idle slots of the emulated device for `jobs`.
    pub fn new(h: &'a Path, jobs: &'a [Job<'a>]) -> Emu<'a> {
        Emu {
            h,
            jobs,
            input: [Vec::new(), Vec::new()],
            output: [Vec::new(), Vec::new()],
            busy: [false; 2],
        }
    }
}

impl cuda::SlotDevice for Emu<'_> {
    fn reserve(&mut self, need: usize) -> anyhow::Result<()> {
        for b in self.input.iter_mut().chain(self.output.iter_mut()) {
            b.resize(need, 0xEE);
        }
        Ok(())
    }

    fn input(&mut self, slot: usize) -> anyhow::Result<&mut [u8]> {
        assert!(!self.busy[slot], "slot {slot} restaged while in flight");
        Ok(&mut self.input[slot])
    }

    fn start(
        &mut self,
        slot: usize,
        job: usize,
        l: &Launch,
        lay: &cuda::Layout,
    ) -> anyhow::Result<()> {
        assert!(!self.busy[slot], "slot {slot} started while in flight");
        let res = run_staged(self.h, &self.input[slot], lay, l, &self.jobs[job]);
        let out = &mut self.output[slot];
        out[..16].copy_from_slice(&res[..16]);
        out[lay.out..lay.out + res.len() - 16].copy_from_slice(&res[16..]);
        // Poison the input: the pipeline must stage again before the next start.
        self.input[slot].fill(0xEE);
        self.busy[slot] = true;
        Ok(())
    }

    fn finish(&mut self, slot: usize) -> anyhow::Result<&[u8]> {
        assert!(self.busy[slot], "slot {slot} finished twice");
        self.busy[slot] = false;
        Ok(&self.output[slot])
    }
}

/// Runs a staged buffer (laid out by `lay`) of launch `l` of `job` through the harness, with
/// the merge or the ties kernel as the job asks: status words, then output.
pub fn run_staged(h: &Path, buf: &[u8], lay: &cuda::Layout, l: &Launch, job: &Job) -> Vec<u8> {
    let mut input = Vec::new();
    for w in [
        job.ties.is_some() as u64,
        cuda::dtype_code(job.from),
        cuda::dtype_code(job.to),
        job.ties.map_or(0.0, |t| t.alpha).to_bits(),
        l.first,
        l.n,
        job.numel,
        TILE,
        EMU_BLOCK,
        job.terms.len() as u64,
    ] {
        input.extend_from_slice(&w.to_le_bytes());
    }
    for r in [
        lay.terms..lay.terms + l.terms.len() * 8,
        lay.values..lay.values + l.values_len,
        lay.offsets..lay.offsets + l.offsets.len() * 8,
        lay.ranks..lay.ranks + l.ranks.len() * 8,
        lay.base..lay.input_end,
    ] {
        input.extend_from_slice(&(r.len() as u64).to_le_bytes());
        input.extend_from_slice(&buf[r.clone()]);
        input.resize(input.len().next_multiple_of(8), 0);
    }
    run(h, &["merge"], &input)
}

/// Runs `jobs` through the GPU path's pipeline (`cuda::run_pipeline`) in slices of `slice`
/// elements, with the emulated kernel as its device, and compares each job's output and
/// overflow count with the CPU merge's (`cpu`, `report`); `what` names the case.
pub fn pipeline_matches_the_cpu(
    h: &Path,
    deltas: &[Input],
    jobs: &[Job],
    slice: u64,
    cpu: &Checkpoint,
    report: &MergeReport,
    what: &str,
) {
    let all = cuda::plan_slices(deltas, jobs, |_| Ok(slice)).unwrap();
    let got = std::sync::Mutex::new(BTreeMap::<String, Vec<u8>>::new());
    let mut emu = Emu::new(h, jobs);
    let overflows = cuda::run_pipeline(&mut emu, deltas, jobs, &all, &|name, at, bytes| {
        let mut g = got.lock().unwrap();
        let v = g.entry(name.to_string()).or_default();
        let end = at as usize + bytes.len();
        if v.len() < end {
            v.resize(end, 0);
        }
        v[at as usize..end].copy_from_slice(bytes);
        Ok(())
    })
    .unwrap();
    let got = got.into_inner().unwrap();
    for (k, j) in jobs.iter().enumerate() {
        let want = cpu.tensor(j.name).unwrap().whole().unwrap();
        let want = &want[..];
        let empty = Vec::new();
        let have = got.get(j.name).unwrap_or(&empty);
        if have != want {
            let size = j.to.size();
            let e = (0..have.len() / size)
                .find(|&e| have[e * size..(e + 1) * size] != want[e * size..(e + 1) * size]);
            panic!(
                "{} ({what}, ties: {}): pipeline output differs at element {e:?} of {}",
                j.name,
                j.ties.is_some(),
                j.numel
            );
        }
        let cpu_overflows = report
            .overflowed
            .iter()
            .find(|(n, _)| n == j.name)
            .map_or(0, |x| x.1);
        assert_eq!(
            overflows[k], cpu_overflows,
            "{} ({what}): overflows",
            j.name
        );
    }
}
