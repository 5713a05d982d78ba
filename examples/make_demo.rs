//! Writes the demo folder: `demo/pipeline.xlsx` (50 deals, English and Chinese stage names,
//! amounts and dates written the many ways reps write them, a "Stage Since" column, and three rows
//! with mistakes for `funnelsync errors` to explain) and `demo/leads.csv` (UTF-8 with BOM, Chinese
//! headers, as Excel's "CSV UTF-8" saves it, without stage dates). Contact and stage dates are
//! counted back from the day the demo is made, so that some deals are stalled. Run from the repo
//! root: `cargo run --example make_demo`. The output is committed; rerun it to change the demo or
//! to bring its dates up to today.

use chrono::{Datelike, Duration, NaiveDate};
use rust_xlsxwriter::{ExcelDateTime, Format, Workbook, XlsxError};

fn excel_date(day: NaiveDate) -> Result<ExcelDateTime, XlsxError> {
    ExcelDateTime::from_ymd(day.year() as u16, day.month() as u8, day.day() as u8)
}

const COMPANIES: [&str; 25] = [
    "Acme Robotics",
    "北京星辰科技有限公司",
    "Globex Trading",
    "上海云帆物流",
    "Initech Software",
    "深圳华光电子",
    "Umbrella Health",
    "杭州青禾食品",
    "Stark Components",
    "广州恒信贸易",
    "Wayne Logistics",
    "成都蓝海软件",
    "Hooli Analytics",
    "南京启明教育",
    "Cyberdyne Systems",
    "苏州天工制造",
    "Soylent Foods",
    "武汉长江能源",
    "Tyrell Biotech",
    "西安古城文化",
    "Vandelay Imports",
    "天津海港物流",
    "Wonka Confectionery",
    "重庆山城火锅连锁",
    "Pied Piper Storage",
];
const CONTACTS: [&str; 10] = [
    "Emma Li",
    "张伟",
    "Liam Chen",
    "王芳",
    "Olivia Zhang",
    "李娜",
    "Noah Wang",
    "刘洋",
    "Ava Liu",
    "陈静",
];
const OWNERS: [&str; 4] = ["Alice Wang", "王伟", "Bob Smith", "李明"];
const STAGES: [&str; 12] = [
    "Lead",
    "潜在客户",
    "Prospect",
    "意向客户",
    "Opportunity",
    "机会",
    "Won",
    "成交",
    "Lost",
    "Closed Won",
    "prospect",
    "Leads",
];
const NEXT_STEPS: [&str; 6] = [
    "Send proposal",
    "安排演示",
    "Follow-up call",
    "发送报价",
    "Contract review",
    "等待客户反馈",
];

fn main() -> Result<(), XlsxError> {
    let today = chrono::Local::now().date_naive();
    let days_ago = |days: u32| today - Duration::days(i64::from(days));
    std::fs::create_dir_all("demo").map_err(XlsxError::IoError)?;
    let mut workbook = Workbook::new();
    let sheet = workbook.add_worksheet();
    sheet.set_name("Pipeline")?;
    let bold = Format::new().set_bold();
    let date_format = Format::new().set_num_format("yyyy-mm-dd");
    let money = Format::new().set_num_format("#,##0");
    sheet.write_string_with_format(0, 0, "FY2026 Sales Pipeline / 2026 销售管道", &bold)?;
    let headers = [
        "CRM ID",
        "Company",
        "Contact",
        "Email",
        "Phone",
        "Stage",
        "Stage Since",
        "Amount",
        "Owner",
        "Next Step",
        "Last Contact",
        "Expected Close",
        "Notes",
    ];
    for (column, header) in headers.iter().enumerate() {
        sheet.write_string_with_format(2, column as u16, *header, &bold)?;
    }
    for deal in 0..50u32 {
        let row = 3 + deal;
        let company = COMPANIES[(deal as usize) % COMPANIES.len()];
        let company = if deal >= 25 {
            format!(
                "{company} ({})",
                if deal % 2 == 0 { "East" } else { "华南" }
            )
        } else {
            company.to_string()
        };
        let contact = CONTACTS[(deal as usize * 7) % CONTACTS.len()];
        sheet.write_string(row, 1, &company)?;
        sheet.write_string(row, 2, contact)?;
        sheet.write_string(
            row,
            3,
            format!("contact{:02}@example{}.com", deal + 1, deal % 5),
        )?;
        let phone = match deal % 3 {
            0 => format!("+86 138-{:04}-{:04}", 1000 + deal, 2000 + deal * 3),
            1 => format!("(021) 6{:03}.{:04}", deal, 4000 + deal),
            _ => format!("139{:08}", 10_000_000 + deal * 977),
        };
        sheet.write_string(row, 4, &phone)?;
        sheet.write_string(row, 5, STAGES[(deal as usize * 5) % STAGES.len()])?;
        // Most rows say since when the deal is in its stage; every fifth leaves it empty (unknown).
        if deal % 5 != 4 {
            sheet.write_datetime_with_format(
                row,
                6,
                excel_date(days_ago(2 + (deal * 11) % 45))?,
                &date_format,
            )?;
        }
        let amount = 5_000 + (deal * 7_919) % 120_000;
        match deal % 4 {
            0 => {
                sheet.write_number_with_format(row, 7, amount as f64, &money)?;
            }
            1 => {
                sheet.write_string(row, 7, format!("¥{},{:03}", amount / 1000, amount % 1000))?;
            }
            2 => {
                sheet.write_string(
                    row,
                    7,
                    format!("${},{:03}.50", amount / 1000, amount % 1000),
                )?;
            }
            _ => {
                sheet.write_string(row, 7, format!("{}万", amount as f64 / 10_000.0))?;
            }
        }
        sheet.write_string(row, 8, OWNERS[(deal as usize) % OWNERS.len()])?;
        sheet.write_string(row, 9, NEXT_STEPS[(deal as usize * 3) % NEXT_STEPS.len()])?;
        let contact_day = days_ago((deal * 7) % 30);
        match deal % 3 {
            0 => {
                sheet.write_datetime_with_format(
                    row,
                    10,
                    excel_date(contact_day)?,
                    &date_format,
                )?;
            }
            1 => {
                sheet.write_string(
                    row,
                    10,
                    format!(
                        "{}年{}月{}日",
                        contact_day.year(),
                        contact_day.month(),
                        contact_day.day()
                    ),
                )?;
            }
            _ => {
                sheet.write_string(row, 10, contact_day.format("%Y/%m/%d").to_string())?;
            }
        }
        sheet.write_datetime_with_format(
            row,
            11,
            excel_date(today + Duration::days(i64::from(10 + (deal * 13) % 170)))?,
            &date_format,
        )?;
        if deal % 6 == 0 {
            sheet.write_string(
                row,
                12,
                if deal % 12 == 0 {
                    "VIP customer"
                } else {
                    "需要法务审核"
                },
            )?;
        }
    }
    // Three rows with the mistakes reps make, for `funnelsync errors` to explain: an amount in
    // words, an email cut short and a stage the funnel does not have.
    let mistakes = [
        [
            "Globex Trading (North)",
            "Liam Chen",
            "liam.chen@globex.example",
            "Lead",
            "twelve thousand",
        ],
        [
            "杭州青禾食品 (二期)",
            "王芳",
            "wangfang@",
            "机会",
            "¥45,000",
        ],
        [
            "Initech Software (EU)",
            "Ava Liu",
            "ava.liu@initech.example",
            "Negotiating",
            "$8,000",
        ],
    ];
    for (index, mistake) in mistakes.iter().enumerate() {
        let row = 53 + index as u32;
        sheet.write_string(row, 1, mistake[0])?;
        sheet.write_string(row, 2, mistake[1])?;
        sheet.write_string(row, 3, mistake[2])?;
        sheet.write_string(row, 5, mistake[3])?;
        sheet.write_string(row, 7, mistake[4])?;
        sheet.write_string(row, 8, OWNERS[index % OWNERS.len()])?;
        sheet.write_datetime_with_format(row, 10, excel_date(days_ago(3))?, &date_format)?;
    }
    sheet.set_column_width(1, 28)?;
    sheet.set_column_width(3, 28)?;
    sheet.set_column_width(6, 12)?;
    sheet.set_column_width(9, 18)?;
    sheet.set_column_width(10, 12)?;
    sheet.set_column_width(11, 14)?;
    let reference = workbook.add_worksheet();
    reference.set_name("Notes")?;
    reference.write_string(0, 0, "Stages: Lead → Prospect → Opportunity → Won / Lost")?;
    workbook.save("demo/pipeline.xlsx")?;

    let mut csv =
        String::from("\u{feff}公司,联系人,邮箱,电话,阶段,金额,负责人,下一步,最近联系\r\n");
    let leads = [
        (
            "青岛海风渔业",
            "赵磊",
            "zhao.lei@qdhaifeng.cn",
            "0532-8888 1234",
            "线索",
            "¥30,000",
            "王伟",
            "电话拜访",
            "{days_ago:9}",
        ),
        (
            "Blue Harbor Ltd",
            "Mia Xu",
            "mia.xu@blueharbor.com",
            "+44 20 7946 0018",
            "Lead",
            "$12,500",
            "Alice Wang",
            "Intro call",
            "{days_ago:11}",
        ),
        (
            "厦门鹭岛茶业",
            "孙丽",
            "sunli@ludao-tea.cn",
            "13912345678",
            "意向客户",
            "8.5万",
            "李明",
            "寄送样品",
            "{days_ago:13}",
        ),
        (
            "Northwind Traders",
            "Ethan Zhou",
            "ethan@northwind.example",
            "+1 (415) 555-0132",
            "Prospect",
            "1 200,50 €",
            "Bob Smith",
            "Demo",
            "{days_ago:6}",
        ),
        (
            "昆明花海园艺",
            "周敏",
            "zhoumin@huahai.cn",
            "0871-6543 2100",
            "潜在客户",
            "15000",
            "王伟",
            "",
            "{days_ago:18}",
        ),
        (
            "Acme Robotics",
            "Emma Li",
            "contact01@example0.com",
            "",
            "Opportunity",
            "",
            "Alice Wang",
            "Pricing call",
            "{days_ago:3}",
        ),
        (
            "大连星海旅游",
            "吴刚",
            "wugang@xinghai.cn",
            "0411-8765 4321",
            "机会",
            "¥120,000",
            "李明",
            "准备合同",
            "{days_ago:2}",
        ),
        (
            "Fabrikam Textiles",
            "Lucas He",
            "lucas.he@fabrikam.example",
            "+86 21 5555 0199",
            "Lead",
            "9,800",
            "Bob Smith",
            "Send brochure",
            "{days_ago:26}",
        ),
    ];
    for lead in leads {
        // "{days_ago:N}": the last contact, N days before the demo was made, written as reps
        // write dates.
        let last_contact = lead
            .8
            .strip_prefix("{days_ago:")
            .and_then(|rest| rest.strip_suffix('}'))
            .and_then(|days| days.parse::<u32>().ok())
            .map(|days| {
                let day = days_ago(days);
                match days % 3 {
                    0 => day.format("%Y-%m-%d").to_string(),
                    1 => day.format("%Y/%m/%d").to_string(),
                    _ => format!("{}年{}月{}日", day.year(), day.month(), day.day()),
                }
            })
            .unwrap_or_else(|| lead.8.to_string());
        let fields = [
            lead.0,
            lead.1,
            lead.2,
            lead.3,
            lead.4,
            lead.5,
            lead.6,
            lead.7,
            last_contact.as_str(),
        ];
        let quoted: Vec<String> = fields
            .iter()
            .map(|field| {
                if field.contains(',') {
                    format!("\"{field}\"")
                } else {
                    field.to_string()
                }
            })
            .collect();
        csv.push_str(&quoted.join(","));
        csv.push_str("\r\n");
    }
    std::fs::write("demo/leads.csv", csv).map_err(XlsxError::IoError)?;
    println!("wrote demo/pipeline.xlsx and demo/leads.csv");
    Ok(())
}
