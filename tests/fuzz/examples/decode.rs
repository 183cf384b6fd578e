//! Prints the steps of a fuzz input: `decode TARGET FILE` (vhost_user_stream, blk_chains,
//! cdev_frames, iommufd_model), to read a crash before it becomes a test.
use vcdev_fuzz::*;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (target, file) = (&args[1], &args[2]);
    let data = std::fs::read(file).expect("input");
    let mut inp = Input::new(&data);
    println!("head byte: {:#x}", inp.u8());
    while !inp.is_empty() {
        match target.as_str() {
            "vhost_user_stream" => println!("{:?}", vu_step(&mut inp)),
            "blk_chains" => println!("{:?}", blk_step(&mut inp)),
            "cdev_frames" => println!("{:?}", cdev_req(&mut inp)),
            _ => println!("{:?}", model_op(&mut inp)),
        }
    }
}
