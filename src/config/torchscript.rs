//! What a TorchScript file says about itself, read without libtorch: the argument names of its
//! `forward`, so that a text model's token inputs need not be declared in model.toml.
//!
//! A TorchScript file is a zip archive (`<top>/data.pkl`, `<top>/code/...py`, ...). `data.pkl`
//! pickles the top-level module, and its first `GLOBAL` names the module's class, e.g.
//! `__torch__.transformers.models.bert.modeling_bert` / `BertModel`; the class's TorchScript
//! source is `<top>/code/__torch__/transformers/models/bert/modeling_bert.py`, where its
//! `def forward(self: ..., input_ids: Tensor, ...)` lists the arguments in order. This is the
//! same text `torch.jit.load(...).code` shows.

use std::io::Read;
use std::path::Path;

/// One argument of a TorchScript `forward` (without `self`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardArg {
    pub name: String,
    /// The TorchScript type as written (`Tensor`, `Optional[Tensor]`, ...).
    pub ty: String,
    /// Whether it has a default value (scripted modules only; a traced forward has none).
    pub has_default: bool,
}

/// Largest `data.pkl` or code file read (a module's pickle holds no tensor data).
const MAX_ENTRY_BYTES: u64 = 64 << 20;

/// The arguments of the top-level module's `forward` in the TorchScript file at `path`.
pub fn forward_args(path: &Path) -> Result<Vec<ForwardArg>, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let mut archive =
        zip::ZipArchive::new(file).map_err(|e| format!("not a TorchScript archive: {e}"))?;
    let top = archive
        .file_names()
        .filter_map(|n| n.strip_suffix("data.pkl"))
        .filter(|prefix| prefix.matches('/').count() == 1)
        .map(String::from)
        .next()
        .ok_or("no <top>/data.pkl in the archive")?;
    let pickle = read_entry(&mut archive, &format!("{top}data.pkl"))?;
    let (module, class) = first_global(&pickle).ok_or("data.pkl names no module class")?;
    let code_path = format!("{top}code/{}.py", module.replace('.', "/"));
    let code = read_entry(&mut archive, &code_path)?;
    let code = String::from_utf8(code).map_err(|_| format!("{code_path} is not UTF-8"))?;
    class_forward_args(&code, &class)
        .ok_or_else(|| format!("{code_path} has no forward for class {class}"))
}

fn read_entry(archive: &mut zip::ZipArchive<std::fs::File>, name: &str) -> Result<Vec<u8>, String> {
    let entry = archive.by_name(name).map_err(|e| format!("{name}: {e}"))?;
    let mut out = Vec::new();
    entry
        .take(MAX_ENTRY_BYTES)
        .read_to_end(&mut out)
        .map_err(|e| format!("{name}: {e}"))?;
    Ok(out)
}

/// The module and name of the first `GLOBAL` opcode (`c<module>\n<name>\n`) of a protocol-2
/// pickle, which is the class of the object pickled.
fn first_global(pickle: &[u8]) -> Option<(String, String)> {
    let rest = pickle.strip_prefix(b"\x80\x02")?.strip_prefix(b"c")?;
    let mut lines = rest.splitn(3, |&b| b == b'\n');
    let module = std::str::from_utf8(lines.next()?).ok()?;
    let name = std::str::from_utf8(lines.next()?).ok()?;
    lines.next()?;
    Some((module.to_string(), name.to_string()))
}

/// The arguments of `class <class>`'s `def forward(...)` in TorchScript source.
fn class_forward_args(code: &str, class: &str) -> Option<Vec<ForwardArg>> {
    let header = format!("class {class}(");
    let start = code
        .lines()
        .scan(0, |offset, line| {
            let here = *offset;
            *offset += line.len() + 1;
            Some((here, line))
        })
        .find(|(_, line)| line.starts_with(&header))?
        .0;
    let body = &code[start + header.len()..];
    // the class ends where the next top-level statement starts
    let end = body
        .match_indices('\n')
        .map(|(i, _)| i + 1)
        .find(|&i| body[i..].starts_with(|c: char| !c.is_whitespace()))
        .unwrap_or(body.len());
    let class_body = &body[..end];
    let def = class_body.find("def forward(")? + "def forward(".len();
    let args = &class_body[def..];
    let close = matching_paren(args)?;
    Some(
        split_top_level(&args[..close])
            .into_iter()
            .filter_map(parse_arg)
            .filter(|a| a.name != "self")
            .collect(),
    )
}

/// The index of the `)` that closes an argument list whose `(` was just before `s`.
fn matching_paren(s: &str) -> Option<usize> {
    let mut depth = 0usize;
    for (i, c) in s.char_indices() {
        match c {
            '(' | '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            ')' if depth == 0 => return Some(i),
            ')' => depth -= 1,
            _ => {}
        }
    }
    None
}

/// `a: T, b: Dict[str, Tensor]=None` split at the commas outside brackets.
fn split_top_level(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut from) = (0usize, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' | '[' => depth += 1,
            ')' | ']' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&s[from..i]);
                from = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[from..]);
    parts
}

fn parse_arg(text: &str) -> Option<ForwardArg> {
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    let (decl, default) = match text.split_once('=') {
        Some((d, _)) => (d, true),
        None => (text, false),
    };
    let (name, ty) = decl.split_once(':').unwrap_or((decl, ""));
    Some(ForwardArg {
        name: name.trim().to_string(),
        ty: ty.trim().to_string(),
        has_default: default,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const TRACED: &str = "class Logits(Module):
  __parameters__ = []
  __buffers__ = []
  model : __torch__.transformers.models.bert.modeling_bert.BertForSequenceClassification
  def forward(self: __torch__.Logits,
    input_ids: Tensor,
    attention_mask: Tensor,
    token_type_ids: Tensor) -> Tensor:
    model = self.model
    return (model).forward(input_ids, attention_mask, token_type_ids, )
class Other(Module):
  def forward(self: __torch__.Other,
    x: Tensor) -> Tensor:
    return x
";

    fn names(args: &[ForwardArg]) -> Vec<&str> {
        args.iter().map(|a| a.name.as_str()).collect()
    }

    #[test]
    fn reads_the_named_class_forward_arguments_in_order() {
        let args = class_forward_args(TRACED, "Logits").unwrap();
        assert_eq!(
            names(&args),
            ["input_ids", "attention_mask", "token_type_ids"]
        );
        assert!(args.iter().all(|a| a.ty == "Tensor" && !a.has_default));
        assert_eq!(names(&class_forward_args(TRACED, "Other").unwrap()), ["x"]);
        assert!(class_forward_args(TRACED, "Missing").is_none());
    }

    #[test]
    fn scripted_defaults_and_nested_types_are_one_argument_each() {
        let code = "class M(Module):
  def forward(self: __torch__.M,
    input_ids: Tensor,
    extra: Dict[str, Tuple[int, int]],
    token_type_ids: Optional[Tensor]=None) -> Tuple[Tensor, Tensor]:
    pass
";
        let args = class_forward_args(code, "M").unwrap();
        assert_eq!(names(&args), ["input_ids", "extra", "token_type_ids"]);
        assert_eq!(args[1].ty, "Dict[str, Tuple[int, int]]");
        assert!(args[2].has_default && !args[0].has_default);
    }

    /// A TorchScript-shaped archive at a fresh temporary path: `data.pkl` naming `class` in
    /// `module`, and `code` as that module's source.
    pub(crate) fn archive(module: &str, class: &str, code: &str) -> std::path::PathBuf {
        use std::io::Write;
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("aiaas-ts-{}-{n}.pt", std::process::id()));
        let mut z = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
        let stored =
            zip::write::FileOptions::default().compression_method(zip::CompressionMethod::Stored);
        z.start_file("archive/data.pkl", stored).unwrap();
        let mut pickle = b"\x80\x02c".to_vec();
        pickle.extend_from_slice(format!("{module}\n{class}\n").as_bytes());
        pickle.extend_from_slice(b"q\x00)\x81}");
        z.write_all(&pickle).unwrap();
        z.start_file(
            format!("archive/code/{}.py", module.replace('.', "/")),
            stored,
        )
        .unwrap();
        z.write_all(code.as_bytes()).unwrap();
        z.start_file("archive/version", stored).unwrap();
        z.write_all(b"3\n").unwrap();
        z.finish().unwrap();
        path
    }

    #[test]
    fn reads_a_forward_from_an_archive_through_its_pickle_and_code() {
        let path = archive("__torch__.a.b", "Logits", TRACED);
        let args = forward_args(&path).unwrap();
        assert_eq!(
            names(&args),
            ["input_ids", "attention_mask", "token_type_ids"]
        );
        std::fs::remove_file(&path).unwrap();
        assert!(forward_args(&path).is_err(), "a missing file is an error");
        let not_zip = std::env::temp_dir().join(format!("aiaas-ts-{}-x.pt", std::process::id()));
        std::fs::write(&not_zip, b"not a zip").unwrap();
        assert!(forward_args(&not_zip).is_err());
        std::fs::remove_file(&not_zip).unwrap();
    }

    #[test]
    fn the_first_global_of_a_pickle_names_the_class() {
        let pickle = b"\x80\x02c__torch__.a.b\nBertModel\nq\x00)\x81}";
        assert_eq!(
            first_global(pickle),
            Some(("__torch__.a.b".into(), "BertModel".into()))
        );
        assert_eq!(first_global(b"\x80\x02}q\x00"), None);
        assert_eq!(first_global(b""), None);
    }
}
