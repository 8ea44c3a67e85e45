//! Sizes as model.toml and the command line write them (`512MiB`, `8GiB`, bytes).

/// `123` (bytes), `512KiB`, `300MiB`, `8GiB`, `1TiB` (also `K`, `M`, `G`, `T`), or decimal
/// `KB`, `MB`, `GB`, `TB`; fractions allowed (`1.5GiB`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("'{s}' is not a size (expected e.g. 512MiB, 8GiB or bytes)"))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024.0 * 1024.0,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        other => return Err(format!("unknown size unit '{other}' in '{s}'")),
    };
    let bytes = number * scale;
    if !(bytes.is_finite() && bytes >= 1.0) {
        return Err(format!("'{s}' is not a positive size"));
    }
    Ok(bytes as u64)
}
